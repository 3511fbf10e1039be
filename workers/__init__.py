"""The Celery side: workers that take accepted deliveries off the Redis queue."""
