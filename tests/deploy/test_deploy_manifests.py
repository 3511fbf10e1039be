"""deploy/: the manifests build with kustomize, validate against the Kubernetes and Tekton schemas,
match what the broker sends and reads, and grant the broker exactly what workers.adapters.kube.RBAC lists."""

from __future__ import annotations

import copy
import json
import re
import shlex
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.main import get_command

import broker.core.pipelinerun as pipelinerun_constants
import broker.core.rollout as rollout_constants
from broker.cli.main import app as cli_app
from broker.core.events import RefKind
from broker.core.pipelinerun import RunRequest, render
from broker.core.rollout import A_DEPLOYED_SHA, CHANGE_CAUSE, set_image_patch
from config.routing import RoutingFile
from config.settings import EnvSettings, load_settings, parse_routing
from tests.support.crd import validate as validate_crd
from tests.support.deploy import (
    DEPLOY,
    OVERLAYS,
    ROOT,
    Object,
    build,
    build_with_components,
    containers,
    find,
    grants,
    is_tekton,
    load_all,
    of_kind,
    pod_spec,
    resource_names,
)
from workers.adapters.kube import ONCALL_RBAC, RBAC

K8S_VERSIONS = ("1.29.0", "1.37.0")  # the oldest Kubernetes we support, and the newest schemas shipped
SHA = "16862e36b2a3a1a1a45b1e5f5e5b1a2c3d4e5f60"
BROKER_SA = ("cibroker", "cibroker")  # namespace, name: the worker's and watcher's identity
ROUTING = DEPLOY / "base" / "routing.yaml"
EXAMPLE = ROOT / "config" / "example.yaml"
PROCESSES = {"cibroker-web": "serve", "cibroker-oncall": "serve", "cibroker-worker": "worker", "cibroker-watcher": "watcher"}

# Where the adapter's calls land: the orchestrator reads and patches a Deployment in the deploy
# target's namespace (routes[].deploy[].namespace); every other call is about a PipelineRun
# and goes to its namespace. A new resource in RBAC must be placed here before it can be granted.
DEPLOY_NAMESPACE_RESOURCES = {("apps", "deployments")}
CI_NAMESPACE_RESOURCES = {("tekton.dev", "pipelineruns"), ("tekton.dev", "taskruns"), ("", "serviceaccounts")}


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> list[Object]:
    """The dev overlay with every optional component of deploy/tekton enabled."""
    return build_with_components(tmp_path_factory.mktemp("kustomize"))


def builds(everything: list[Object]) -> dict[str, list[Object]]:
    return {**{o: list(build(o)) for o in OVERLAYS}, "dev+components": everything}


@lru_cache
def deploy_routing() -> RoutingFile:
    return parse_routing(ROUTING.read_text(), source=str(ROUTING))


@lru_cache
def example_routing() -> RoutingFile:
    return parse_routing(EXAMPLE.read_text(), source=str(EXAMPLE))


def request(ref: str = "refs/heads/main") -> RunRequest:
    kind = RefKind.TAG if ref.startswith("refs/tags/") else RefKind.BRANCH
    return RunRequest(delivery_id="01a2018ebee46132f6ae6571c7", host="gitlab", host_kind="gitlab", repo="acme/shop-api",
                      repo_id="42", ref=ref, kind=kind, name=ref.split("/", 2)[2], sha=SHA, attempt=1,
                      received_at="2026-11-22T04:41:01.924Z")


def rendered_runs(routing: RoutingFile) -> list[dict]:
    return [render(routing, route, request(ref), git_url=route.clone_url or "https://gitlab.example.com/x.git")
            for route in routing.routes for ref in ("refs/heads/main", "refs/tags/v1.2.0")]


def ci_namespaces(routing: RoutingFile) -> set[str]:
    return {r.namespace or routing.defaults.namespace for r in routing.routes}


def deploy_namespaces(routing: RoutingFile) -> set[str]:
    return {d.namespace for r in routing.routes for d in r.deploy}


def secret_templates() -> dict[str, dict[str, str]]:
    docs = load_all((DEPLOY / "secrets" / "broker-secrets.example.yaml").read_text())
    return {d["metadata"]["name"]: d["stringData"] for d in docs}


# -- parsing and building ------------------------------------------------------------------------

def test_every_yaml_file_under_deploy_parses_without_duplicate_keys() -> None:
    """Every manifest (and kustomization) is YAML whose documents are Kubernetes-shaped mappings."""
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) > 20
    for path in files:
        docs = load_all(path.read_text())
        assert docs, path
        for doc in docs:
            if path == ROUTING:
                continue
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"{path}: {doc!r:.80}"


def test_the_duplicate_key_check_bites() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate"):
        load_all("a: 1\nb: 2\na: 3\n")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_builds_the_whole_broker_and_the_catalog(overlay: str) -> None:
    """kubectl kustomize deploy/overlays/<env> gives the three processes, Redis, RBAC and the Tekton catalog."""
    objects = build(overlay)
    for name in PROCESSES:
        find(objects, "Deployment", name, "cibroker")
    find(objects, "StatefulSet", "redis", "cibroker")
    find(objects, "Service", "cibroker-web", "cibroker")
    find(objects, "Ingress", "cibroker-web", "cibroker")
    find(objects, "Pipeline", "build-test-push", "ci")
    find(objects, "ServiceAccount", "pipeline-bot", "ci")
    assert {o["metadata"]["name"] for o in of_kind(objects, "Task")} == {
        "git-checkout", "unit-test", "kaniko-build-push", "docker-build-push-dind", "docker-build-push-shared",
        "deploy-set-image"}
    assert not of_kind(objects, "Secret"), "apply -k must never overwrite the Secrets an engineer filled in"
    for obj in objects:
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"].get("namespace"), f"{obj['kind']} {obj['metadata']['name']} has no namespace"


def test_the_optional_components_build_and_add_what_they_say(everything: list[Object]) -> None:
    find(everything, "Deployment", "docker-dind", "ci")
    find(everything, "PersistentVolumeClaim", "docker-dind-cache", "ci")
    find(everything, "Service", "docker-dind", "ci")
    find(everything, "CronJob", "docker-dind-prune", "ci")
    find(everything, "DaemonSet", "docker-dind-node", "ci")
    ci = find(everything, "Namespace", "ci")
    assert ci["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert find(build("dev"), "Namespace", "ci")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"


def test_overlays_set_image_replicas_and_host() -> None:
    dev, prod = build("dev"), build("production")
    for name in PROCESSES:
        assert find(dev, "Deployment", name)["spec"]["replicas"] == 1
        assert find(prod, "Deployment", name)["spec"]["replicas"] >= 2
        [c] = containers(find(prod, "Deployment", name))
        assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:\d+\.\d+\.\d+", c["image"]), c["image"]
    assert find(prod, "Ingress", "cibroker-web")["spec"]["tls"]


# -- schemas ----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_validate_against_the_kubernetes_schemas(version: str, everything: list[Object]) -> None:
    """Strict: an unknown field anywhere is an error, as `kubectl apply --validate=strict` would say."""
    for label, objects in builds(everything).items():
        for obj in objects:
            if is_tekton(obj):
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{label}: {obj['kind']} {obj['metadata']['name']} against {version}: {exc}")


def test_the_kubernetes_schema_check_is_not_vacuous() -> None:
    deployment = copy.deepcopy(find(build("dev"), "Deployment", "cibroker-web"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystem"] = True  # belongs in securityContext
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_tekton_objects_validate_against_the_crds(everything: list[Object]) -> None:
    tekton = [o for o in everything if is_tekton(o)]
    assert {o["kind"] for o in tekton} == {"Task", "Pipeline"}
    for obj in tekton:
        assert obj["apiVersion"] == "tekton.dev/v1", "the catalog is tekton.dev/v1 (PipelineResources are gone)"
        validate_crd(obj, obj["kind"].lower() + "s")


def test_the_crd_check_catches_a_misspelt_task_field() -> None:
    task = copy.deepcopy(find(build("dev"), "Task", "kaniko-build-push"))
    task["spec"]["steps"][0]["arguments"] = task["spec"]["steps"][0].pop("args")
    with pytest.raises(AssertionError, match="arguments"):
        validate_crd(task, "tasks")


@pytest.mark.parametrize("routing", [example_routing, deploy_routing], ids=["config/example.yaml", "deploy/base/routing.yaml"])
def test_the_pipelineruns_the_broker_renders_validate_against_the_crd(routing) -> None:
    runs = rendered_runs(routing())
    assert runs
    for body in runs:
        validate_crd(body)
    with pytest.raises(jsonschema.ValidationError):
        broken = copy.deepcopy(runs[0])
        broken["spec"]["params"] = {"git-url": "x"}
        validate_crd(broken)


# -- the Pipeline's interface is what the broker sends ---------------------------------------------

def pipeline_interface(pipeline: Object) -> tuple[set[str], set[str], set[str], set[str]]:
    """(all params, params without a default, all workspaces, required workspaces)."""
    spec = pipeline["spec"]
    params = {p["name"] for p in spec.get("params", [])}
    required = {p["name"] for p in spec.get("params", []) if "default" not in p}
    workspaces = {w["name"] for w in spec.get("workspaces", [])}
    required_ws = {w["name"] for w in spec.get("workspaces", []) if not w.get("optional")}
    return params, required, workspaces, required_ws


def interface_problems(body: dict, pipeline: Object) -> list[str]:
    params, required, workspaces, required_ws = pipeline_interface(pipeline)
    sent = {p["name"] for p in body["spec"]["params"]}
    bound = {w["name"] for w in body["spec"].get("workspaces", [])}
    return ([f"param {p!r} is not declared by the Pipeline" for p in sorted(sent - params)]
            + [f"param {p!r} is required but not sent" for p in sorted(required - sent)]
            + [f"workspace {w!r} is not declared by the Pipeline" for w in sorted(bound - workspaces)]
            + [f"workspace {w!r} is required but not bound" for w in sorted(required_ws - bound)])


def test_every_catalog_pipeline_takes_exactly_the_brokers_params_and_workspaces() -> None:
    """Any route may name any of the three Pipelines: all require git-url, git-revision, image; source, dockerconfig."""
    pipelines = of_kind(build("dev"), "Pipeline")
    assert {p["metadata"]["name"] for p in pipelines} == {"build-test-push", "build-test-push-dind", "build-test-push-docker"}
    sent = {p["name"] for p in rendered_runs(deploy_routing())[0]["spec"]["params"]}
    assert sent == {"git-url", "git-revision", "image"}
    for pipeline in pipelines:
        _, required, _, required_ws = pipeline_interface(pipeline)
        assert required == sent, pipeline["metadata"]["name"]
        assert required_ws == {"source", "dockerconfig"}, pipeline["metadata"]["name"]


def test_the_deployed_routing_files_runs_fit_their_pipelines() -> None:
    """Every PipelineRun the broker renders from deploy/base/routing.yaml names a catalog Pipeline and fits it."""
    objects = build("dev")
    for body in rendered_runs(deploy_routing()):
        pipeline = find(objects, "Pipeline", body["spec"]["pipelineRef"]["name"], body["metadata"]["namespace"])
        assert interface_problems(body, pipeline) == []


def test_an_interface_mismatch_is_reported() -> None:
    pipeline = find(build("dev"), "Pipeline", "build-test-push")
    body = rendered_runs(deploy_routing())[0]
    body["spec"]["params"].append({"name": "tag-name", "value": "x"})
    body["spec"]["workspaces"] = [w for w in body["spec"]["workspaces"] if w["name"] != "dockerconfig"]
    assert interface_problems(body, pipeline) == ["param 'tag-name' is not declared by the Pipeline",
                                                  "workspace 'dockerconfig' is required but not bound"]


def test_the_example_routing_file_is_the_deployed_one_and_its_runs_fit_the_catalog() -> None:
    """config/example.yaml has the routes deployed (workspaces included), and their PipelineRuns fit the Pipelines."""
    example, deployed = example_routing(), deploy_routing()
    assert example.defaults == deployed.defaults and example.hosts == deployed.hosts
    assert list(deployed.routes) == list(example.routes)
    objects = build("dev")
    for body in rendered_runs(example):
        pipeline = find(objects, "Pipeline", body["spec"]["pipelineRef"]["name"], body["metadata"]["namespace"])
        assert interface_problems(body, pipeline) == []


VARIABLE = re.compile(r"\$\((params|results|workspaces|tasks)\.([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_-]+))?[^)]*\)")


def references(obj: object) -> list[tuple[str, str, str]]:
    return [m.groups("") for m in VARIABLE.finditer(json.dumps(obj))]


def test_tasks_only_use_the_params_results_and_workspaces_they_declare() -> None:
    """What Tekton's admission webhook would refuse and the CRD schema does not see."""
    for task in of_kind(build("dev"), "Task"):
        spec, name = task["spec"], task["metadata"]["name"]
        declared = {"params": {p["name"] for p in spec.get("params", [])},
                    "results": {r["name"] for r in spec.get("results", [])},
                    "workspaces": {w["name"] for w in spec.get("workspaces", [])}}
        for kind, ref, _ in references(spec):
            assert ref in declared[kind], f"Task {name} uses $({kind}.{ref}...) but does not declare it"


def test_pipelines_wire_their_tasks_correctly() -> None:
    """Every taskRef exists, gets all its required params and workspaces and nothing undeclared, in the right order."""
    objects = build("dev")
    tasks = {t["metadata"]["name"]: t["spec"] for t in of_kind(objects, "Task")}
    for pipeline in of_kind(objects, "Pipeline"):
        spec, pname = pipeline["spec"], pipeline["metadata"]["name"]
        params = {p["name"] for p in spec["params"]}
        workspaces = {w["name"] for w in spec["workspaces"]}
        order = [t["name"] for t in spec["tasks"]]
        assert order[:3] == ["checkout", "test", "build-and-push"], pname
        for pt in spec["tasks"]:
            task = tasks[pt["taskRef"]["name"]]
            given = {p["name"] for p in pt.get("params", [])}
            t_params = {p["name"] for p in task.get("params", [])}
            t_required = {p["name"] for p in task.get("params", []) if "default" not in p}
            assert given <= t_params and t_required <= given, (pname, pt["name"], given, t_params)
            mapped = {w["name"]: w["workspace"] for w in pt.get("workspaces", [])}
            t_ws = {w["name"] for w in task.get("workspaces", []) if not w.get("optional")}
            assert set(mapped) == t_ws and set(mapped.values()) <= workspaces, (pname, pt["name"])
            for after in pt.get("runAfter", []):
                assert order.index(after) < order.index(pt["name"])
            for kind, ref, _ in references(pt):
                if kind == "params":
                    assert ref in params, f"{pname}/{pt['name']} uses undeclared $(params.{ref})"
                if kind == "tasks":
                    assert ref in order and order.index(ref) < order.index(pt["name"]), (pname, pt["name"], ref)
        assert [t["runAfter"] for t in spec["tasks"][1:3]] == [["checkout"], ["test"]]


def test_the_build_checks_out_the_brokers_commit_and_pushes_the_image_the_broker_tagged() -> None:
    """git-revision reaches the checkout; image (already tagged :<commit> by the broker) is the push destination."""
    objects = build("dev")
    body = rendered_runs(deploy_routing())[0]
    sent = {p["name"]: p["value"] for p in body["spec"]["params"]}
    assert sent["image"].endswith(f":{SHA}") and sent["git-revision"] == SHA
    pipeline = find(objects, "Pipeline", "build-test-push")["spec"]
    by_name = {t["name"]: {p["name"]: p["value"] for p in t["params"]} for t in pipeline["tasks"]}
    assert by_name["checkout"]["revision"] == "$(params.git-revision)"
    assert by_name["build-and-push"]["image"] == "$(params.image)"
    kaniko = find(objects, "Task", "kaniko-build-push")["spec"]["steps"][0]
    assert "--destination=$(params.image)" in kaniko["args"]
    assert {"name": "DOCKER_CONFIG", "value": "$(workspaces.dockerconfig.path)"} in kaniko["env"]


def test_the_dind_task_talks_tls_to_its_sidecar_and_waits_for_its_ca() -> None:
    task = find(build("dev"), "Task", "docker-build-push-dind")["spec"]
    [step], [sidecar] = task["steps"], task["sidecars"]
    env = {e["name"]: e["value"] for e in step["env"]}
    assert env["DOCKER_HOST"] == "tcp://localhost:2376" and env["DOCKER_TLS_VERIFY"] == "1"
    certs = {m["name"]: m["mountPath"] for m in step["volumeMounts"]}["dind-certs"]
    assert env["DOCKER_CERT_PATH"] == certs
    assert {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}["dind-certs"] == certs
    assert sidecar["readinessProbe"]["exec"]["command"] == ["ls", f"{certs}/ca.pem"]
    assert {"name": "dind-certs", "emptyDir": {}} in task["volumes"]


def test_the_shared_daemon_admits_only_the_task_that_builds_on_it(everything: list[Object]) -> None:
    """NetworkPolicies select pods by the tekton.dev/task label, whose value must be the Task's name."""
    task = find(everything, "Task", "docker-build-push-shared")
    default_host = {p["name"]: p.get("default") for p in task["spec"]["params"]}["docker-host"]
    service = find(everything, "Service", "docker-dind", "ci")
    assert default_host == f"tcp://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for name in ("docker-dind", "docker-dind-node"):
        policy = find(everything, "NetworkPolicy", name, "ci")
        selectors = [p["podSelector"]["matchLabels"] for r in policy["spec"]["ingress"] for p in r["from"]]
        assert {"tekton.dev/task": "docker-build-push-shared"} in selectors
        assert all(list(s) in (["tekton.dev/task"], ["app.kubernetes.io/name"]) for s in selectors)
    node_service = find(everything, "Service", "docker-dind-node", "ci")
    assert node_service["spec"]["internalTrafficPolicy"] == "Local"
    prune = find(everything, "CronJob", "docker-dind-prune", "ci")
    [c] = containers(prune)
    assert c["command"] == ["docker", "system", "prune", "-af"]
    assert {"name": "DOCKER_HOST", "value": default_host} in c["env"]


def test_the_in_pipeline_deploy_sends_the_brokers_own_set_image_patch() -> None:
    """Same patch shape and annotation keys as broker.core.rollout.set_image_patch, so both deploy paths leave one trail."""
    task = find(build("dev"), "Task", "deploy-set-image")["spec"]
    args = task["steps"][0]["args"]
    [patch_arg] = [a for a in args if a.startswith("--patch=")]
    sent = json.loads(patch_arg.removeprefix("--patch=").replace("$(params.revision)", SHA)
                      .replace("$(params.container)", "api").replace("$(params.image)", "img:1"))
    expected = set_image_patch(container="api", image="img:1", change_cause="x", annotations={A_DEPLOYED_SHA: SHA})
    assert set(sent["metadata"]["annotations"]) == {CHANGE_CAUSE, A_DEPLOYED_SHA}
    assert sent["metadata"]["annotations"][A_DEPLOYED_SHA] == SHA
    assert sent["spec"] == expected["spec"]
    assert "--type=strategic" in args
    assert task["steps"][1]["args"][:2] == ["rollout", "status"]


# -- the broker's processes --------------------------------------------------------------------

def parse_cli(args: list[str]) -> dict:
    """Parse a `cibroker ...` argument list the way the real CLI would (unknown options raise)."""
    group = get_command(cli_app)
    parent = group.make_context("cibroker", [args[0]], resilient_parsing=True)
    command = group.get_command(parent, args[0])
    assert command is not None, args[0]
    return command.make_context(args[0], list(args[1:]), parent=parent).params


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_process_runs_its_command_with_the_mounted_routing_file(overlay: str) -> None:
    objects = build(overlay)
    routing_cm = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith("cibroker-routing-")]
    assert len(routing_cm) == 1 and routing_cm[0]["data"]["routing.yaml"] == ROUTING.read_text()
    for name, command in PROCESSES.items():
        deployment = find(objects, "Deployment", name)
        [c] = containers(deployment)
        assert c["args"][0] == command
        params = parse_cli(c["args"])
        assert str(params["config"]) == "/etc/cibroker/routing.yaml"
        mount = {m["name"]: m for m in c["volumeMounts"]}["routing"]
        volume = {v["name"]: v for v in pod_spec(deployment)["volumes"]}["routing"]
        assert mount["mountPath"] == "/etc/cibroker" and mount["readOnly"] is True
        assert volume["configMap"]["name"] == routing_cm[0]["metadata"]["name"]
    web = parse_cli(containers(find(objects, "Deployment", "cibroker-web"))[0]["args"])
    assert (web["host"], web["port"]) == ("0.0.0.0", 8080)


def test_the_cli_check_rejects_an_unknown_option() -> None:
    with pytest.raises(Exception, match="--concurency"):
        parse_cli(["worker", "--concurency", "2"])


def test_the_procfile_names_web_worker_and_watcher_with_valid_commands() -> None:
    entries = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    assert set(entries) == {"web", "worker", "watcher"}
    for name, line in entries.items():
        argv = shlex.split(line.replace("${PORT:-8080}", "8080"))
        assert argv[0] == "cibroker" and argv[1] == {"web": "serve"}.get(name, name)
        parse_cli(argv[1:])


def process_environment(objects: list[Object], name: str) -> dict[str, str]:
    """What the Deployment's container sees: its ConfigMaps, the Secret templates' keys (filled with
    dummy values, as a platform engineer would fill them) and its own env entries."""
    [c] = containers(find(objects, "Deployment", name))
    templates = secret_templates()
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objects, "ConfigMap", source["configMapRef"]["name"], "cibroker")["data"])
        else:
            env.update({k: f"dummy-{k.lower()}" for k in templates[source["secretRef"]["name"]]})
    for entry in c.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in templates[ref["name"]], ref
            env[entry["name"]] = {"CIBROKER_REDIS_URL": "redis://:x@redis.cibroker.svc:6379/0",
                                  "CIBROKER_SIGNING_KEY": "k" * 32}.get(entry["name"], "x")
        else:
            env[entry["name"]] = entry["value"]
    return env


def test_the_environment_config_map_holds_only_valid_cibroker_settings() -> None:
    [env_cm] = [o for o in of_kind(build("dev"), "ConfigMap") if o["metadata"]["name"].startswith("cibroker-env-")]
    for key in env_cm["data"]:
        assert key.startswith("CIBROKER_") and key.removeprefix("CIBROKER_").lower() in EnvSettings.model_fields, key
    settings = EnvSettings.from_environ(env_cm["data"])
    assert settings.log_format == "json" and settings.log_level == "debug"  # the dev overlay's merge took
    assert str(settings.config) == "/etc/cibroker/routing.yaml"


@pytest.mark.parametrize("name", PROCESSES)
def test_each_process_gets_every_secret_the_routing_file_names(name: str, tmp_path: Path) -> None:
    """load_settings succeeds on the environment the Deployment builds: every {env: NAME} is provided."""
    env = process_environment(list(build("production")), name)
    env["CIBROKER_STATE_DIR"] = str(tmp_path)
    settings = load_settings(env, config_path=ROUTING)
    assert settings.env.redis_url is not None and settings.env.api_token_values()
    token_warnings = [w for w in settings.warnings if ".token:" in w]
    assert [w for w in settings.warnings if w not in token_warnings] == []  # every webhook secret slot is provided
    if name == "cibroker-worker":  # posts the commit statuses
        assert token_warnings == [] and all(c.token for c in settings.credentials.values())
    else:  # the host API tokens stay out of the edge and the watcher
        assert token_warnings and not any(k.endswith("_API_TOKEN") for k in env)


@pytest.mark.parametrize("name", PROCESSES)
def test_the_signing_key_goes_to_the_worker_watcher_and_oncall_and_never_to_the_edge(name: str) -> None:
    """Workers and the watcher sign and verify runs, on-call signs requests; the webhook edge needs no key to forge with."""
    env = process_environment(list(build("production")), name)
    settings = load_settings({**env, "CIBROKER_STATE_DIR": "/nonexistent"}, config_path=ROUTING)
    if name == "cibroker-web":
        assert "CIBROKER_SIGNING_KEY" not in env and settings.signing_key is None
    else:
        assert settings.require_signing_key() == b"k" * 32


def test_secret_templates_hold_no_values_and_name_what_the_tasks_need() -> None:
    for path in (DEPLOY / "secrets" / "broker-secrets.example.yaml", DEPLOY / "tekton" / "secrets" / "pipeline-secrets.example.yaml"):
        for secret in load_all(path.read_text()):
            assert secret["kind"] == "Secret" and "data" not in secret
            for key, value in secret["stringData"].items():
                assert value in ("", '{"auths": {}}'), f"{path.name}: {secret['metadata']['name']}.{key} holds a value"
            kubernetes_validate.validate(secret, K8S_VERSIONS[0], strict=True)
    pipeline_secrets = {s["metadata"]["name"]: s for s in load_all((DEPLOY / "tekton" / "secrets" / "pipeline-secrets.example.yaml").read_text())}
    git = pipeline_secrets["git-basic-auth"]
    assert git["type"] == "kubernetes.io/basic-auth" and git["metadata"]["annotations"]["tekton.dev/git-0"].startswith("https://")
    registry = pipeline_secrets["registry-credentials"]
    assert registry["type"] == "kubernetes.io/dockerconfigjson"
    sa = find(build("dev"), "ServiceAccount", deploy_routing().defaults.service_account, deploy_routing().defaults.namespace)
    assert {s["name"] for s in sa["secrets"]} == set(pipeline_secrets)
    dockerconfig = [w for r in deploy_routing().routes for w in r.workspaces if w["name"] == "dockerconfig"]
    assert dockerconfig and all(w["secret"]["secretName"] == "registry-credentials"
                                and w["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
                                for w in dockerconfig)


# -- security ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_broker_and_redis_pods_are_non_root_read_only_and_capability_free(overlay: str) -> None:
    workloads = [o for o in build(overlay) if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["namespace"] == "cibroker"]
    assert len(workloads) == 5
    for workload in workloads:
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in containers(workload):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    web = containers(find(build(overlay), "Deployment", "cibroker-web"))[0]
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_redis_keeps_an_append_only_file_on_a_persistent_volume() -> None:
    redis = find(build("production"), "StatefulSet", "redis")
    [c] = containers(redis)
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "always"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    data_dir = args[args.index("--dir") + 1]
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["data"] == data_dir
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_selectors_match_the_pods_they_mean(everything: list[Object]) -> None:
    """Services, PDBs and NetworkPolicies select existing pods; a typo in a label would select nothing."""
    pods = [(o["metadata"]["namespace"], pod_spec_labels(o)) for o in everything
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "CronJob")]

    def selects(namespace: str, match: dict[str, str]) -> bool:
        return any(ns == namespace and match.items() <= labels.items() for ns, labels in pods)

    for svc in of_kind(everything, "Service"):
        assert selects(svc["metadata"]["namespace"], svc["spec"]["selector"]), svc["metadata"]["name"]
    for pdb in of_kind(everything, "PodDisruptionBudget"):
        assert selects(pdb["metadata"]["namespace"], pdb["spec"]["selector"]["matchLabels"]), pdb["metadata"]["name"]
    for policy in of_kind(everything, "NetworkPolicy"):
        match = policy["spec"]["podSelector"].get("matchLabels", {})
        assert selects(policy["metadata"]["namespace"], match), policy["metadata"]["name"]
    backend = find(everything, "Ingress", "cibroker-web")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = find(everything, "Service", backend["name"], "cibroker")
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def pod_spec_labels(workload: Object) -> dict[str, str]:
    spec = workload["spec"]["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else workload["spec"]
    return spec["template"]["metadata"]["labels"]


def test_only_the_web_edge_is_reachable_and_redis_only_from_the_broker() -> None:
    objects = build("production")
    deny = find(objects, "NetworkPolicy", "default-deny-ingress", "cibroker")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    redis = find(objects, "NetworkPolicy", "redis", "cibroker")["spec"]
    assert redis["egress"] == [] and redis["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cibroker", "app.kubernetes.io/part-of": "cibroker"}}}]


# -- least privilege: the Roles grant exactly workers.adapters.kube.RBAC ----------------------------------

def expected_grants(routing: RoutingFile) -> dict[str, set[tuple[str, str, str]]]:
    unplaced = {(g, r) for g, r, _ in RBAC} - DEPLOY_NAMESPACE_RESOURCES - CI_NAMESPACE_RESOURCES
    assert not unplaced, f"workers.adapters.kube.RBAC has {unplaced}: say in this test which namespace those calls go to"
    out: dict[str, set[tuple[str, str, str]]] = {}
    for ns in ci_namespaces(routing):
        out.setdefault(ns, set()).update(t for t in RBAC if t[:2] in CI_NAMESPACE_RESOURCES)
    for ns in deploy_namespaces(routing):
        out.setdefault(ns, set()).update(t for t in RBAC if t[:2] in DEPLOY_NAMESPACE_RESOURCES)
    return out


def rbac_problems(objects: list[Object], routing: RoutingFile) -> list[str]:
    granted = grants(objects, kind="ServiceAccount", name=BROKER_SA[1], namespace=BROKER_SA[0])
    expected = expected_grants(routing)
    problems = []
    for ns in sorted(set(granted) | set(expected)):
        for t in sorted(expected.get(ns, set()) - granted.get(ns, set())):
            problems.append(f"{ns}: missing {t} (the broker calls it; workers.adapters.kube.RBAC)")
        for t in sorted(granted.get(ns, set()) - expected.get(ns, set())):
            problems.append(f"{ns}: grants {t}, which the broker never calls there")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_broker_is_granted_exactly_what_the_kubernetes_adapter_calls(overlay: str) -> None:
    """Derived from workers.adapters.kube.RBAC: CI namespaces get the Tekton and ServiceAccount verbs, deploy namespaces the Deployment verbs."""
    objects = list(build(overlay))
    assert rbac_problems(objects, deploy_routing()) == []
    assert set().union(*grants(objects, kind="ServiceAccount", name="cibroker", namespace="cibroker").values()) == RBAC


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_oncall_pods_may_only_read_runs(overlay: str) -> None:
    """cibroker-oncall (API, dashboard) gets workers.adapters.kube.ONCALL_RBAC in every CI namespace, which writes nothing:
    no patch (cancel is a signed request a worker carries out), no create, no delete; the webhook edge gets none."""
    objects, routing = list(build(overlay)), deploy_routing()
    granted = grants(objects, kind="ServiceAccount", name="cibroker-oncall", namespace="cibroker")
    assert granted == {ns: set(ONCALL_RBAC) for ns in ci_namespaces(routing)}
    assert {verb for verbs in granted.values() for _, _, verb in verbs} == {"get", "list"}
    pod = pod_spec(find(objects, "Deployment", "cibroker-oncall"))
    assert pod["serviceAccountName"] == "cibroker-oncall" and pod["automountServiceAccountToken"] is True
    paths = {p["path"]: p["backend"]["service"]["name"]
             for p in find(objects, "Ingress", "cibroker-web")["spec"]["rules"][0]["http"]["paths"]}
    assert paths == {"/hooks/": "cibroker-web", "/api/": "cibroker-oncall", "/openapi.json": "cibroker-oncall",
                     "/": "cibroker-oncall", "/runs/": "cibroker-oncall", "/deliveries/": "cibroker-oncall"}


def test_the_rbac_comparison_reports_an_extra_and_a_missing_verb() -> None:
    objects = copy.deepcopy(list(build("dev")))
    role = find(objects, "Role", "cibroker-ci", "ci")
    role["rules"][0]["verbs"] = [v for v in role["rules"][0]["verbs"] if v != "patch"] + ["deletecollection"]
    assert rbac_problems(objects, deploy_routing()) == [
        "ci: missing ('tekton.dev', 'pipelineruns', 'patch') (the broker calls it; workers.adapters.kube.RBAC)",
        "ci: grants ('tekton.dev', 'pipelineruns', 'deletecollection'), which the broker never calls there"]


def test_resource_names_cover_every_deployment_and_service_account_the_routing_file_names() -> None:
    objects, routing = list(build("dev")), deploy_routing()
    for ns in deploy_namespaces(routing):
        wanted = {d.deployment for r in routing.routes for d in r.deploy if d.namespace == ns}
        names = resource_names(objects, ns, "apps", "deployments")
        assert names is None or wanted <= names, (ns, wanted, names)
    for ns in ci_namespaces(routing):
        wanted = {r.service_account or routing.defaults.service_account for r in routing.routes
                  if (r.namespace or routing.defaults.namespace) == ns}
        names = resource_names(objects, ns, "", "serviceaccounts")
        assert names is None or wanted <= names, (ns, wanted, names)


def test_no_wildcards_no_cluster_roles_and_no_api_access_for_the_edge_redis_or_pipelines(everything: list[Object]) -> None:
    for label, objects in builds(everything).items():
        assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding"), label
        for role in of_kind(objects, "Role"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
        for sa in ("cibroker-web", "cibroker-redis"):
            assert grants(objects, kind="ServiceAccount", name=sa, namespace="cibroker") == {}
            assert find(objects, "ServiceAccount", sa, "cibroker")["automountServiceAccountToken"] is False
        web = pod_spec(find(objects, "Deployment", "cibroker-web"))
        assert web["serviceAccountName"] == "cibroker-web" and web["automountServiceAccountToken"] is False
    assert grants(build("dev"), kind="ServiceAccount", name="pipeline-bot", namespace="ci") == {}
    assert find(build("dev"), "ServiceAccount", "pipeline-bot", "ci")["automountServiceAccountToken"] is False


def test_the_deploy_task_component_grants_the_pipeline_only_what_kubectl_needs(everything: list[Object]) -> None:
    """kubectl patch (get, patch) and kubectl rollout status (list, watch) on Deployments in the deploy namespace."""
    assert grants(everything, kind="ServiceAccount", name="pipeline-bot", namespace="ci") == {
        "staging": {("apps", "deployments", v) for v in ("get", "patch", "list", "watch")}}
    assert find(everything, "ServiceAccount", "pipeline-bot", "ci")["automountServiceAccountToken"] is True


# -- names shared with the code ----------------------------------------------------------------

def code_keys() -> set[str]:
    modules = (pipelinerun_constants, rollout_constants)
    return {v for m in modules for v in vars(m).values() if isinstance(v, str) and v.startswith("cibroker.dev/")}


def test_every_cibroker_label_or_annotation_key_under_deploy_is_one_the_code_defines() -> None:
    used: dict[str, set[str]] = {}
    for path in DEPLOY.rglob("*"):
        if path.suffix in (".yaml", ".md"):
            for key in re.findall(r"cibroker\.dev/[a-z0-9-]+", path.read_text()):
                used.setdefault(key, set()).add(str(path.relative_to(ROOT)))
    assert used, "deploy/ should use at least the deployed-sha annotation and the delivery label"
    unknown = {k: v for k, v in used.items() if k not in code_keys()}
    assert unknown == {}, f"keys the code does not define: {unknown}"
    assert A_DEPLOYED_SHA in used and pipelinerun_constants.L_DELIVERY in used


def test_the_routing_selector_the_watcher_uses_is_what_rendered_runs_carry() -> None:
    key, value = pipelinerun_constants.MANAGED_BY
    for body in rendered_runs(deploy_routing()):
        assert body["metadata"]["labels"][key] == value


# -- the image ---------------------------------------------------------------------------------

def test_the_dockerfile_is_multi_stage_and_runs_as_a_numeric_non_root_user() -> None:
    """Not built here (no Docker engine): its shape is checked instead."""
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2 and " AS build" in froms[0] and " AS runtime" in froms[-1]
    runtime = lines[lines.index(froms[-1]):]
    [user] = [ln for ln in runtime if ln.upper().startswith("USER ")]
    uid, _, gid = user.split()[1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0)
    assert any(ln.startswith("COPY --from=build ") for ln in runtime)
    assert not any(ln.startswith("COPY ") and "--from=" not in ln for ln in runtime), "the runtime stage gets only the venv"
    assert 'ENTRYPOINT ["cibroker"]' in runtime
    for deployment in PROCESSES:
        [c] = containers(find(build("dev"), "Deployment", deployment))
        assert int(uid) == pod_spec(find(build("dev"), "Deployment", deployment))["securityContext"]["runAsUser"]
        assert "command" not in c, "the image's ENTRYPOINT is cibroker; the manifests give only its arguments"
    ignore = [ln for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ignore[0] == "*" and set(ignore[1:]) >= {"!pyproject.toml", "!broker/", "!workers/", "!config/"}
