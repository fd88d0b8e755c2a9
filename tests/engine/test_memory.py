"""Resident memory of a loaded SmolLM2 (subprocess): RSS growth from load + decode <= 1.5x file size, from a
baseline taken after the libraries' one-off set-up (runtime_env.warm_up), as benchmarks/engine.py measures."""
import json
import subprocess
import sys
import textwrap

import pytest

from tests.support.engine import smollm2_gguf

SCRIPT = textwrap.dedent("""
    import json, sys, psutil, torch
    torch.set_num_threads(1)
    from mesh402.engine import Engine
    from mesh402.engine.runtime_env import warm_up
    import mesh402.engine.tokenizer, mesh402.engine.chat_template  # code, not model memory
    warm_up()  # the libraries' one-off set-up (oneDNN, packed kernels, TorchScript), as benchmarks/engine.py does
    proc = psutil.Process()
    base = proc.memory_info().rss
    eng = Engine.load(sys.argv[1], mode=sys.argv[2])
    loaded = proc.memory_info().rss
    peak = loaded
    s = eng.new_session(64)
    lg = s.prefill([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28])
    peak = max(peak, proc.memory_info().rss)
    for _ in range(16):
        lg = s.decode(int(lg.argmax()))
        peak = max(peak, proc.memory_info().rss)
    print(json.dumps({"load": loaded - base, "peak": peak - base, "weights": eng.weight_bytes,
                      "file": eng.info.file_bytes}))
""")


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_rss_within_budget(mode):
    path = smollm2_gguf()
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path), mode], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = r["peak"] / r["file"]
    print(f"\n{mode}: RSS growth load {r['load'] / 2**20:.1f} MiB, peak {r['peak'] / 2**20:.1f} MiB, "
          f"weights held {r['weights'] / 2**20:.1f} MiB, file {r['file'] / 2**20:.1f} MiB, ratio {ratio:.2f}")
    assert ratio <= 1.5
