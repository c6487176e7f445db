"""`wisp cluster`'s pieces that need no replica: the SDK's affinity cookies, the serve flags handed to replicas,
the generated HAProxy config, and the one-line errors."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import pytest
from wisp_cloud.balancer import haproxy_config
from wisp_cloud.cli_cluster import add_parser, serve_argv
from wisp_sdk.errors import WispError
from wisp_sdk.transport import AffinityCookies


def test_affinity_cookies_are_kept_replaced_and_deleted():
    jar = AffinityCookies()
    assert jar.header() is None
    jar.update(["WISPSRV=r0; path=/", "other=1"])
    assert jar.header() == "WISPSRV=r0; other=1"
    jar.update(["WISPSRV=r1"])  # the balancer moved the session: the new replica wins
    assert jar.header() == "WISPSRV=r1; other=1"
    jar.update(["other=; Max-Age=0", "garbage without equals ;;; \x00"])
    assert jar.header() == "WISPSRV=r1"
    jar.clear()
    assert jar.header() is None and len(jar) == 0


def _cluster_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["cluster", *argv])


def test_serve_flags_pass_to_the_replicas_except_the_clusters_own():
    args = _cluster_args(
        "--replicas", "3", "--target", "m", "--policy", "wisp", "--profile-on-start", "--port", "9000",
        "--host", "127.0.0.1", "--device", "cuda", "--tenant-weight", "a=2", "--tenant-weight", "b=0.5",
    )  # fmt: skip
    argv = serve_argv(args)
    assert argv == [
        "--target", "m", "--policy", "wisp", "--profile-on-start",
        "--tenant-weight", "a=2.0", "--tenant-weight", "b=0.5",
    ]  # fmt: skip


@pytest.mark.parametrize("flag", [["--metrics-port", "9100"], ["--tls-cert", "c.pem"]])
def test_flags_that_replicas_cannot_share_are_refused(flag):
    with pytest.raises(WispError, match="wisp cluster does not take"):
        serve_argv(_cluster_args("--replicas", "2", "--target", "m", *flag))


def test_generated_config_is_valid_haproxy(tmp_path):
    cfg = haproxy_config("127.0.0.1", 8765, [("r0", 9001), ("r1", 9002)])
    for must in (
        "cookie WISPSRV insert indirect nocache",
        "uri /ready",
        "option redispatch",
        "timeout tunnel",
        "option forwardfor",
    ):
        assert must in cfg
    assert "server r1 127.0.0.1:9002 cookie r1" in cfg
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed: config syntax not checked")
    (tmp_path / "h.cfg").write_text(cfg)
    check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "h.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_missing_haproxy_is_one_line_saying_how_to_install_it(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "wisp_sdk.cli", "cluster", "--replicas", "2", "--target", str(tmp_path),
         "--haproxy", str(tmp_path / "no-haproxy")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "apt-get install haproxy" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("visible", "per", "want"),
    [
        ("0,1", 1, ["0", "1", "0"]),
        ("0,1,2,3,4,5,6,7", 4, ["0,1,2,3", "4,5,6,7", "0,1,2,3"]),
        ("3,5,7", 2, ["3,5"] * 3),
    ],
)
def test_replicas_get_their_own_gpus(monkeypatch, visible, per, want):
    from wisp_cloud.cluster import Cluster

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr("wisp_cloud.cluster.find_haproxy", lambda binary: binary)
    c = Cluster(3, ["--target", "m"], device="cuda", gpus_per_replica=per)
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in c.replicas] == want
    assert all(r.serve_args[-2:] == ["--device", "cuda"] for r in c.replicas)
    too_many = len(visible.split(",")) + 1
    with pytest.raises(WispError, match=f"needs {too_many} GPUs"):
        Cluster(1, ["--target", "m"], device="cuda", gpus_per_replica=too_many)
