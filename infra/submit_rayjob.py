"""Creates one RayJob for the Kubernetes Job this pod belongs to, and waits until the RayJob has ended.

Run by infra/cronjob.yaml's CronJob (``concurrencyPolicy: Forbid``): the CronJob's Job stays active for as
long as the RayJob runs, so the schedule never starts a run while the previous one is still going.

    python infra/submit_rayjob.py /etc/vit-embed/rayjob.yaml

- The RayJob is the manifest with the Job's name (env ``JOB_NAME``) and an owner reference to the Job (env
  ``JOB_UID``): deleting the Job (the CronJob keeps a few) deletes its RayJob.
- A retried pod (node lost, evicted) finds the RayJob it created already there and waits for it: a Job
  never starts two runs.
- Exit status 0 when the RayJob's Ray job SUCCEEDED; 1 when it failed, was stopped or vanished.

Talks to the API server with the pod's service account (needs ``create`` and ``get`` on ``rayjobs``);
standard library and PyYAML only, as in the project's image.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class Api:
    """The few Kubernetes API calls needed, as (status, JSON body)."""

    def __init__(self, base: str, token: str = "", context: ssl.SSLContext | None = None) -> None:
        self.base, self.token, self.context = base.rstrip("/"), token, context

    @classmethod
    def in_cluster(cls) -> Api:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", (SERVICE_ACCOUNT / "token").read_text().strip(), context)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=60, context=self.context) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                return e.code, json.loads(payload or b"{}")
            except ValueError:
                return e.code, {"message": payload.decode(errors="replace")}


def rayjob_for(manifest: dict, job_name: str, job_uid: str) -> dict:
    """The manifest as this Job's RayJob: the Job's name, owned by the Job."""
    rayjob = json.loads(json.dumps(manifest))
    meta = rayjob.setdefault("metadata", {})
    meta.pop("namespace", None)
    meta.pop("generateName", None)
    meta["name"] = job_name
    meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": job_uid}]
    return rayjob


def outcome(rayjob: dict) -> str | None:
    """'succeeded', 'failed', or None while the RayJob may still run (or retry)."""
    status = rayjob.get("status") or {}
    deployment = status.get("jobDeploymentStatus", "")
    if deployment == "Complete":
        return "succeeded" if status.get("jobStatus") == "SUCCEEDED" else "failed"
    if deployment == "ValidationFailed":  # the spec is refused: no retry
        return "failed"
    if deployment == "Failed":  # retried while `failed` is within spec.backoffLimit
        retries = (rayjob.get("spec") or {}).get("backoffLimit") or 0
        return "failed" if int(status.get("failed") or 0) >= retries + 1 else None
    return None


def run(api: Api, namespace: str, manifest: dict, job_name: str, job_uid: str, poll_s: float) -> int:
    path = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
    code, body = api.call("POST", path, rayjob_for(manifest, job_name, job_uid))
    if code == 409:
        print(f"RayJob {job_name} exists already (this Job's earlier pod created it); waiting for it")
    elif code >= 300:
        print(f"creating RayJob {job_name} failed: HTTP {code}: {body.get('message', body)}", file=sys.stderr)
        return 1
    else:
        print(f"created RayJob {namespace}/{job_name}")
    last = None
    while True:
        code, body = api.call("GET", f"{path}/{job_name}")
        if code == 404:
            print(f"RayJob {job_name} was deleted before it ended", file=sys.stderr)
            return 1
        if code >= 300:  # the API server restarting, a network blip: try again
            print(f"reading RayJob {job_name}: HTTP {code}; retrying", file=sys.stderr)
        else:
            status = body.get("status") or {}
            now = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
            if now != last:
                print(f"RayJob {job_name}: deployment {now[0] or 'New'}, job {now[1] or '-'}", flush=True)
                last = now
            result = outcome(body)
            if result is not None:
                message = status.get("message")
                print(f"RayJob {job_name} {result}" + (f": {message}" if message else ""))
                return 0 if result == "succeeded" else 1
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path, help="the RayJob manifest (infra/rayjob.yaml)")
    p.add_argument("--poll-s", type=float, default=30.0, help="seconds between status reads")
    args = p.parse_args(argv)
    manifest = yaml.safe_load(args.manifest.read_text())
    namespace = (SERVICE_ACCOUNT / "namespace").read_text().strip()
    job_name, job_uid = os.environ["JOB_NAME"], os.environ["JOB_UID"]
    return run(Api.in_cluster(), namespace, manifest, job_name, job_uid, args.poll_s)


if __name__ == "__main__":
    sys.exit(main())
