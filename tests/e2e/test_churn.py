"""Backend churn under live load: a client keeps opening connections to a ClusterIP while its
Deployment is scaled down, a pod is deleted and the Deployment is scaled up again. Deleted pods go
through graceful deletion (their endpoints turn `terminating` and drain), so no request may fail:
removed backends must stop receiving new connections before they disappear."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import HERE, PYCILIUM, Lab, eventually

pytestmark = pytest.mark.e2e


def deployment(replicas: int) -> str:
    return f"""
apiVersion: v1
kind: Namespace
metadata: {{name: churn}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: churn}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, ports: [{{name: http, containerPort: 8080}}]}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: churn}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: churn}}
spec: {{nodeName: node1, containers: [{{name: c}}]}}
"""


def web_pods(lab: Lab) -> list[str]:
    out = lab.kubectl("-n", "churn", "get", "pods", "-l", "app=web", "-o", "json").stdout
    return sorted(
        p["metadata"]["name"] for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")
    )


def test_backend_churn_under_live_load(lab: Lab) -> None:
    lab.apply(deployment(4))
    try:
        vip = lab.cluster_ip("churn/web")
        before = web_pods(lab)
        assert len(before) == 4
        load = subprocess.Popen(
            [PYCILIUM, "lab", "exec", "churn/client", "--", sys.executable, str(HERE / "load.py"), vip, "80",
             "--seconds", "14", "--timeout", "2"],
            env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(2)
            lab.apply(deployment(2), wait=False)  # scale down: two backends go away gracefully
            eventually(lambda: len(web_pods(lab)) == 2, what="2 pods")
            time.sleep(2)
            victim = web_pods(lab)[0]
            lab.kubectl("-n", "churn", "delete", "pod", victim, "--wait=false")  # replaced by the Deployment
            time.sleep(2)
            lab.apply(deployment(4))  # and back up, with the agents programmed before it returns
            out, err = load.communicate(timeout=60)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        assert load.returncode == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        after = web_pods(lab)
        assert len(after) == 4 and victim not in after
        assert res["total"] > 200, res  # the load really ran through the churn
        assert res["failures"] == [], res
        # the load was spread over old and new backends alike
        new = set(after) - set(before)
        assert new and any(p in res["pods"] for p in new), res
        assert len(res["pods"]) >= 5, res
    finally:
        lab.delete(deployment(4), wait=False)
