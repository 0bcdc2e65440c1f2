"""infra/ stays true to the code and to the schemas: manifests validate (infra/validate.py, and it fails on
a broken copy), their command lines are ones jobs/embed.py accepts, the schedule runs the same job and never
two at once, the cluster-launcher config matches the RayJob, and the image copies paths that exist."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from jobs.embed import config_from_args, parse_args

INFRA = Path(__file__).resolve().parent.parent / "infra"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"infra_{name}", INFRA / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _module("validate")
submit = _module("submit_rayjob")


def _load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _load_all(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((INFRA / name).read_text())}


def _entrypoint_config(spec: dict):
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/embed.py"]
    return config_from_args(parse_args(argv[2:]))


def test_rayjob_runs_the_job_with_valid_flags_on_cpu_and_gpu_groups():
    job = _load("rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    config = _entrypoint_config(job["spec"])
    assert config.input.startswith("s3://") and config.output.startswith("s3://")
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu-embed"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = groups["cpu-decode"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and "nvidia.com/gpu" not in cpu
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_images_and_dockerfile_agree():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "rayproject/ray:2.60.0" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (INFRA.parent / src).exists(), src
    job = _load("rayjob.yaml")
    images = {c["image"] for c in _containers(job)}
    assert images == {"vit-embed:0.1.0"}


def test_minio_compose_creates_the_buckets_the_examples_use():
    compose = _load("minio-compose.yaml")
    buckets = compose["services"]["buckets"]["entrypoint"]
    for uri in ("s3://images", "s3://embeddings", "s3://models"):
        assert f"local/{uri.removeprefix('s3://')}" in buckets


def _containers(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "containers":
                yield from v
            else:
                yield from _containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _containers(v)


# --------------------------------------------------------------------------------------------------------
# infra/validate.py


def test_validator_passes_on_infra(capsys: pytest.CaptureFixture[str]):
    assert validate.main([str(INFRA)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for checked in (
        "yamllint 5 files",
        "hadolint Dockerfile",
        "rayjob.yaml: RayJob/vit-embed",
        "cronjob.yaml: CronJob/vit-embed-nightly",
        "cronjob.yaml: Role/vit-embed-scheduler",
        "kustomization.yaml: Kustomization",
        "cluster.yaml: Ray cluster vit-embed",
    ):
        assert f"ok   {checked}" in lines
    assert not [line for line in lines if line.startswith("FAIL")]


# what: (file, text, replacement, the check that must fail, a phrase of its message)
BREAKAGES = {
    "an unknown RayJob field": (
        "rayjob.yaml",
        "  shutdownAfterJobFinishes: true",
        "  shutdownAfterJobFinish: true",
        "rayjob.yaml: RayJob/vit-embed",
        "'shutdownAfterJobFinish' was unexpected",
    ),
    "a wrong type in the RayJob's pod template": (
        "rayjob.yaml",
        "replicas: 2",
        "replicas: two",
        "rayjob.yaml: RayJob/vit-embed",
        "workerGroupSpecs.0.replicas: 'two' is not of type 'integer'",
    ),
    "an unknown CronJob field": (
        "cronjob.yaml",
        "  concurrencyPolicy: Forbid",
        "  concurrency: Forbid",
        "cronjob.yaml: CronJob/vit-embed-nightly",
        "'concurrency' was unexpected",
    ),
    "a wrong type in a core object": (
        "cronjob.yaml",
        "backoffLimit: 3",
        "backoffLimit: three",
        "cronjob.yaml: CronJob/vit-embed-nightly",
        "'three' is not of type",
    ),
    "a ray.io kind without a vendored schema": (
        "rayjob.yaml",
        "kind: RayJob",
        "kind: RayCronJob",
        "rayjob.yaml: RayCronJob/vit-embed",
        "no KubeRay schema vendored",
    ),
    "trailing spaces in YAML": ("minio-compose.yaml", "volumes:\n", "volumes:   \n", "yamllint", "trailing"),
    "a Dockerfile hadolint rejects": (
        "Dockerfile",
        "WORKDIR /home/ray/vit-embed",
        "WORKDIR vit-embed",
        "hadolint Dockerfile",
        "DL3000",
    ),
    "a cluster config Ray rejects": (
        "cluster.yaml",
        "head_node_type: head",
        "head_node_type: gpu",
        "cluster.yaml: Ray cluster vit-embed",
        "head_node_type",
    ),
    "a cluster config with an unknown key": (
        "cluster.yaml",
        "  pull_before_run: true",
        "  pull: true",
        "cluster.yaml: Ray cluster vit-embed",
        "'pull' was unexpected",
    ),
    "a Kustomization naming a missing file": (
        "kustomization.yaml",
        "[rayjob.yaml]",
        "[ray-job.yaml]",
        "kustomization.yaml: Kustomization",
        "ray-job.yaml",
    ),
}


@pytest.mark.parametrize("what", list(BREAKAGES))
def test_validator_fails_on_a_broken_copy(what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    name, old, new, check, message = BREAKAGES[what]
    copy = tmp_path / "infra"
    shutil.copytree(INFRA, copy, ignore=shutil.ignore_patterns("schemas", "__pycache__"))
    text = (copy / name).read_text()
    assert text.count(old) == 1, old
    (copy / name).write_text(text.replace(old, new))
    assert validate.main([str(copy)]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    expected = "yamllint 5 files" if check == "yamllint" else check
    assert [line.split(None, 1)[1] for line in failed] == [expected], out
    assert message in out.split(failed[0], 1)[1], out


def test_ci_runs_the_validator_before_the_tests():
    ci = (INFRA.parent / ".ci" / "run").read_text()
    assert "infra/validate.py" in ci
    assert ci.index("infra/validate.py") < ci.index(".venv/bin/pytest")


# --------------------------------------------------------------------------------------------------------
# The schedule: a CronJob that never starts a run while the previous one is still going


def test_the_schedule_forbids_concurrent_runs_and_runs_exactly_the_rayjob():
    objects = _load_all("cronjob.yaml")
    cron = objects["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["schedule"]
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:2] == ["python", "infra/submit_rayjob.py"]
    assert (
        container["image"]
        == _load("rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"]
    )
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert mount["name"] == volume["name"]
    # The manifest it reads is infra/rayjob.yaml itself, through the ConfigMap the Kustomization generates.
    kustomization = _load("kustomization.yaml")
    assert kustomization["resources"] == ["cronjob.yaml"]
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == volume["configMap"]["name"] and generator["files"] == ["rayjob.yaml"]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    assert container["command"][2] == f"{mount['mountPath']}/rayjob.yaml"
    # The pod's service account may create and read RayJobs, nothing else.
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    binding = objects["RoleBinding"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert binding["roleRef"]["name"] == objects["Role"]["metadata"]["name"]
    assert objects["Role"]["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}
    ]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {
        "JOB_NAME": "metadata.labels['batch.kubernetes.io/job-name']",
        "JOB_UID": "metadata.labels['batch.kubernetes.io/controller-uid']",
    }


class FakeKubernetes(ThreadingHTTPServer):
    """The RayJob endpoints of an API server: POST creates (409 when the name exists), GET returns the
    object with the next of `statuses` on each read (the last one repeats)."""

    def __init__(self, statuses: list[dict]) -> None:
        self.statuses, self.rayjobs, self.creates, self.vanish = statuses, {}, [], False
        super().__init__(("127.0.0.1", 0), _FakeHandler)


class _FakeHandler(BaseHTTPRequestHandler):
    server: FakeKubernetes

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        assert self.path == "/apis/ray.io/v1/namespaces/jobs/rayjobs"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = body["metadata"]["name"]
        self.server.creates.append(body)
        if name in self.server.rayjobs:
            return self._send(409, {"reason": "AlreadyExists"})
        self.server.rayjobs[name] = body
        return self._send(201, body)

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.server.rayjobs or self.server.vanish:
            return self._send(404, {"reason": "NotFound"})
        status = self.server.statuses.pop(0) if len(self.server.statuses) > 1 else self.server.statuses[0]
        return self._send(200, {**self.server.rayjobs[name], "status": status})


@pytest.fixture()
def fake_api():
    servers = []

    def start(statuses: list[dict]):
        server = FakeKubernetes(statuses)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, submit.Api(f"http://127.0.0.1:{server.server_address[1]}")

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}


def test_submitter_creates_one_rayjob_and_waits_until_it_has_ended(fake_api):
    manifest = _load("rayjob.yaml")
    statuses = [{}, {"jobDeploymentStatus": "Initializing"}, RUNNING, RUNNING]
    server, api = fake_api([*statuses, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    assert submit.run(api, "jobs", manifest, "vit-embed-nightly-29000000", "uid-1", poll_s=0) == 0
    assert server.statuses == [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]  # read through
    (created,) = server.creates
    assert created["metadata"]["name"] == "vit-embed-nightly-29000000"
    assert created["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "vit-embed-nightly-29000000", "uid": "uid-1"}
    ]
    assert created["spec"] == manifest["spec"]
    # A retried pod of the same Job finds its RayJob and waits for it: still one RayJob.
    assert submit.run(api, "jobs", manifest, "vit-embed-nightly-29000000", "uid-1", poll_s=0) == 0
    assert len(server.rayjobs) == 1 and len(server.creates) == 2


@pytest.mark.parametrize(
    ("status", "backoff"),
    [
        ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}, None),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, None),
        ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "failed": 1}, None),
        ({"jobDeploymentStatus": "ValidationFailed"}, None),
        ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "failed": 2}, 1),
    ],
)
def test_submitter_fails_when_the_rayjob_fails(fake_api, status: dict, backoff: int | None):
    manifest = _load("rayjob.yaml")
    if backoff is not None:
        manifest["spec"]["backoffLimit"] = backoff
    server, api = fake_api([RUNNING, status])
    assert submit.run(api, "jobs", manifest, "j-1", "uid", poll_s=0) == 1
    assert not server.statuses[:-1]


def test_submitter_keeps_waiting_while_the_rayjob_retries():
    rayjob = {"spec": {"backoffLimit": 2}, "status": {"jobDeploymentStatus": "Failed", "failed": 1}}
    assert submit.outcome(rayjob) is None
    rayjob["status"]["failed"] = 3
    assert submit.outcome(rayjob) == "failed"
    assert submit.outcome({"status": {"jobDeploymentStatus": "Retrying"}}) is None


def test_submitter_fails_when_the_rayjob_vanishes(fake_api):
    server, api = fake_api([RUNNING])
    server.vanish = True  # deleted by someone else after its creation
    assert submit.run(api, "jobs", _load("rayjob.yaml"), "j-3", "uid", poll_s=0) == 1
    assert len(server.creates) == 1


# --------------------------------------------------------------------------------------------------------
# infra/cluster.yaml: the Ray cluster launcher's config


def _submit_command_in_comments(text: str) -> list[str]:
    lines = [line.removeprefix("#").strip() for line in text.splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
    command = ""
    for line in lines[start:]:
        command += " " + line.removesuffix("\\")
        if not line.endswith("\\"):
            break
    return shlex.split(command)


def test_cluster_config_matches_the_rayjob():
    cluster, job = _load("cluster.yaml"), _load("rayjob.yaml")
    pods = {g["groupName"]: g["template"]["spec"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert cluster["docker"]["image"] == pods["gpu-embed"]["containers"][0]["image"]
    types = cluster["available_node_types"]
    assert set(types) == {"head", *pods}
    assert cluster["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["cpu-decode"]["min_workers"] < types["cpu-decode"]["max_workers"]  # autoscaling
    assert types["gpu-embed"]["min_workers"] >= 1  # the job places its GPU actors on the GPUs alive
    idle = {e["name"]: e["value"] for e in pods["cpu-decode"]["containers"][0]["env"]}
    setting = f"RAY_idle_worker_killing_time_threshold_ms={idle['RAY_idle_worker_killing_time_threshold_ms']}"
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert setting in commands[-1] and "ray start" in commands[-1]
    assert "--num-cpus=0" in cluster["head_start_ray_commands"][-1]
    # The documented submit command is the RayJob's job, with flags jobs/embed.py accepts.
    argv = _submit_command_in_comments((INFRA / "cluster.yaml").read_text())
    assert argv[:3] == ["ray", "job", "submit"] and "--working-dir" in argv
    job_argv = argv[argv.index("--") + 1 :]
    assert job_argv == shlex.split(job["spec"]["entrypoint"])
    config = config_from_args(parse_args(job_argv[2:]))
    assert config.input.startswith("s3://")


# --------------------------------------------------------------------------------------------------------
# Health: the image's check


def test_version_reports_the_project_torch_cuda_and_ray():
    import ray
    import torch

    from pipeline.plan import project_version

    proc = subprocess.run(
        [sys.executable, str(INFRA.parent / "jobs" / "embed.py"), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"vit-embed {project_version()}"
    assert lines[1] == f"torch {torch.__version__}"
    assert lines[2].startswith(f"CUDA {torch.version.cuda or 'none'}")
    assert lines[3] == f"ray {ray.__version__}"
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert 'CMD ["python", "jobs/embed.py", "--version"]' in dockerfile
