"""The `cibroker` command: process start-up and the on-call verbs."""
