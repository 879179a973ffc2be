"""The local Ray that Seedline starts listens on loopback only: every listening socket of the driver and of
every process it started (GCS, raylet with its object manager, workers, dashboard, agents) is checked
while a stage runs Ray tasks and an actor."""

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# A project stage (loaded through SEEDLINE_STAGE_MODULES) that starts Ray the way every built-in stage does,
# makes it start workers (tasks and an actor), then records the listening sockets of its process tree.
PLUGIN = textwrap.dedent('''
    import json, os
    import psutil
    from pipeline import storage
    from pipeline.stage import StrictModel, register

    class ProbeConfig(StrictModel):
        tasks: int = 4

    def _listening():
        me = psutil.Process()
        out = []
        for p in [me, *me.children(recursive=True)]:
            try:
                conns = p.net_connections(kind="inet")
                name = " ".join(p.cmdline()[:2])[-120:] or p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            out += [{"pid": p.pid, "proc": name, "ip": c.laddr.ip, "port": c.laddr.port}
                    for c in conns if c.status == psutil.CONN_LISTEN]
        return out

    def run(config, ctx):
        ctx.init_ray()
        import ray

        @ray.remote
        def square(x):
            return x * x

        @ray.remote
        class Counter:
            def __init__(self):
                self.n = 0
            def add(self, k):
                self.n += k
                return self.n

        squares = ray.get([square.remote(i) for i in range(config.tasks)])
        assert squares == [i * i for i in range(config.tasks)]
        counter = Counter.remote()
        assert ray.get(counter.add.remote(3)) == 3
        storage.write_json(ctx.path("listening.json"), _listening())

    register("probe", ProbeConfig, "1", f"{__name__}:run")
''')


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, an IPv4 loopback socket on a dual-stack listener
    return addr.is_loopback


def test_is_loopback_helper():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("::ffff:127.0.0.1")
    assert not any(_is_loopback(ip) for ip in ("0.0.0.0", "::", "::ffff:10.0.0.1", "192.0.2.2"))


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(tmp_path):
    (tmp_path / "probeplugin.py").write_text(PLUGIN)
    env = dict(os.environ, SEEDLINE_STAGE_MODULES="probeplugin")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2])])
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # Seedline must set what it needs itself
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(f"name: probe\nworkdir: {tmp_path / 'w'}\ntracking: {{enabled: false}}\n"
                   "ray: {num_cpus: 2}\nstages:\n  probe: {}\n")
    res = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(next((tmp_path / "w").rglob("listening.json")).read_text())
    procs = " ".join(s["proc"] for s in found)
    # The probe saw the whole node, not just the driver.
    for part in ("gcs_server", "raylet", "dashboard", "ray::"):
        assert part in procs, f"no listening socket of {part} found: {procs}"
    exposed = [s for s in found if not _is_loopback(s["ip"])]
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
