"""Helpers of ddkd.runtime that the stages share."""

import os

import torch

from ddkd.runtime import global_cpu_rng_from, make_generator


def test_global_cpu_rng_from_is_reproducible_and_leaves_the_callers_rng_alone():
    with torch.random.fork_rng(devices=[]):  # this test's own seed, not the session's
        torch.random.default_generator.manual_seed(123)  # the CPU's alone, as the helper
        before = torch.random.get_rng_state()
        draws = []
        for _ in range(2):
            with global_cpu_rng_from(make_generator(7, 1)):
                draws.append(torch.randn(5))
        assert torch.equal(draws[0], draws[1])
        assert torch.equal(torch.random.get_rng_state(), before)
        with global_cpu_rng_from(make_generator(7, 2)):
            assert not torch.equal(torch.randn(5), draws[0])


def test_compile_cache_is_kept_apart_per_instruction_set(monkeypatch):
    """Kernels cached under one kernel capability poison runs under another (NaN losses, a
    crash in free()): ddkd gives each (ATen, oneDNN) pair its own folder, unless the user
    chose one."""
    from ddkd.runtime import separate_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    native = separate_compile_cache()
    assert native is not None and native.endswith("ddkd-avx512-onednn-all")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == native

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    limited = separate_compile_cache()
    assert limited is not None and limited.endswith("ddkd-avx2-onednn-avx2")
    assert os.path.dirname(limited) == os.path.dirname(native)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/chosen/by/the/user")
    assert separate_compile_cache() is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/chosen/by/the/user"


def test_the_cli_keeps_the_compile_cache_apart_before_dynamo_fixes_it(tmp_path):
    """``import torch._dynamo`` sets TORCHINDUCTOR_CACHE_DIR to the shared default; the CLI
    must choose its folder first (checked in a fresh process, where dynamo is not loaded)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHINDUCTOR_CACHE_DIR", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    code = ("import os\n"
            "from ddkd.cli import main\n"
            "assert main(['inspect', 'missing.h5']) == 2  # any command: main runs first\n"
            "import torch._dynamo  # what torch.compile imports\n"
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout.strip()
    assert os.path.basename(out).startswith("ddkd-") and "-onednn-" in out, out
