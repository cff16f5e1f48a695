"""XLA:CPU settings made before JAX starts: the convolution kernels (fgnet_jax.cpu_devices).

Each case runs in a fresh interpreter, because XLA reads its flags once per process and this
test process already started JAX (with the suite's settings from conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from child_env import child_env, user_xla_flags  # tests/child_env.py
from fgnet_jax.cpu_devices import use_cpu_convolutions

# A ResNet-shaped convolution stack and its gradient and forward-over-reverse HVP; printed as
# JSON with the XLA_FLAGS the process ended up with.
_PROGRAM = textwrap.dedent(
    """
    import json, os, sys
    from fgnet_jax.cpu_devices import use_cpu_convolutions
    applied = use_cpu_convolutions(sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np

    def loss(kernels, x):
        for stride, kernel in zip((1, 2), kernels):
            x = jax.nn.relu(jax.lax.conv_general_dilated(
                x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return jnp.mean(x ** 2)

    keys = jax.random.split(jax.random.key(0), 4)
    kernels = [jax.random.normal(keys[0], (3, 3, 8, 16)) * 0.2, jax.random.normal(keys[1], (3, 3, 16, 16)) * 0.1]
    x = jax.random.normal(keys[2], (4, 12, 12, 8))
    direction = [jax.random.normal(key, k.shape) for key, k in zip(jax.random.split(keys[3]), kernels)]
    gradient = jax.grad(loss)
    hvp = jax.jvp(lambda k: gradient(k, x), (kernels,), (direction,))[1]
    print(json.dumps({"applied": applied, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "value": float(loss(kernels, x)),
                      "gradient": [np.asarray(g).ravel().tolist() for g in gradient(kernels, x)],
                      "hvp": [np.asarray(h).ravel().tolist() for h in hvp]}))
    """
)


USERS_OWN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=reduce"
EIGEN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


@pytest.fixture(scope="module")
def runs():
    """The program under each setting, in three interpreters started together (each mostly
    imports JAX: side by side they share the machine's cores)."""
    settings = {"eigen": ("eigen", ""), "ynnpack": ("ynnpack", ""), "users_own": ("eigen", USERS_OWN_FLAG)}
    processes = {}
    for name, (kind, xla_flags) in settings.items():
        env = child_env(xla_flags)  # the flags the suite was started with, and this setting's
        processes[name] = subprocess.Popen([sys.executable, "-c", _PROGRAM, kind], env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        results[name] = dict(json.loads(stdout.strip().splitlines()[-1]), stderr=stderr)
    return results


def xla_starts_with(flag: str) -> bool:
    """Whether XLA:CPU starts with ``flag`` in XLA_FLAGS (it aborts on a flag or value it does not know)."""
    child = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=child_env(flag, JAX_PLATFORMS="cpu"),
                           capture_output=True, text=True, timeout=300)
    return child.returncode == 0


@pytest.mark.slow
def test_eigen_and_ynnpack_convolutions_agree_in_value_gradient_and_hvp(runs):
    eigen, ynnpack = runs["eigen"], runs["ynnpack"]
    # Whichever jaxlib is installed: the flag is set (and the program ran with it), or XLA does
    # not know it and the call said so in one line and set nothing.
    if eigen["applied"]:
        assert eigen["xla_flags"].split()[-1] == EIGEN_FLAG and "RuntimeWarning" not in eigen["stderr"]
    else:
        assert eigen["xla_flags"] == user_xla_flags() and not xla_starts_with(EIGEN_FLAG)
        assert f"RuntimeWarning: CPU convolutions stay jaxlib's default: the installed XLA refuses {EIGEN_FLAG}" \
            in eigen["stderr"]
    assert not ynnpack["applied"] and ynnpack["xla_flags"] == user_xla_flags()
    np.testing.assert_allclose(eigen["value"], ynnpack["value"], rtol=1e-5)
    for name in ("gradient", "hvp"):
        for a, b in zip(eigen[name], ynnpack[name], strict=True):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.max(np.abs(b)))


@pytest.mark.slow
def test_a_users_own_xla_flag_wins(runs):
    assert not runs["users_own"]["applied"]
    assert runs["users_own"]["xla_flags"] == " ".join(f for f in (user_xla_flags(), USERS_OWN_FLAG) if f)


def test_bad_kind_and_late_call_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown CPU convolution kernels"):
        use_cpu_convolutions("mkl")
    # This test process imported JAX long ago (conftest + other tests): a call that would change
    # XLA_FLAGS now is refused; one asking for what XLA_FLAGS already holds changes nothing.
    import jax  # noqa: F401

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
    assert use_cpu_convolutions("eigen") is False
    with pytest.raises(RuntimeError, match="before jax is imported"):
        use_cpu_convolutions("ynnpack")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert use_cpu_convolutions("ynnpack") is False
    with pytest.raises(RuntimeError, match="before jax is imported"):
        use_cpu_convolutions("eigen")


# The call with a flag no XLA knows (as a jaxlib without the convolution flag would see it): set
# nothing, warn in one line quoting XLA, and leave a process that starts JAX normally.
_REFUSED_PROGRAM = textwrap.dedent(
    """
    import json, os, sys
    from fgnet_jax import cpu_devices
    cpu_devices._EIGEN_CONVOLUTIONS = sys.argv[1]
    applied = cpu_devices.use_cpu_convolutions("eigen")
    import jax
    print(json.dumps({"applied": applied, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "devices": len(jax.devices())}))
    """
)


@pytest.mark.parametrize("refused", ["--xla_cpu_experimental_ynn_fusion_type=-no_such_fusion_type",
                                     "--xla_cpu_no_such_flag_in_any_jaxlib=1"], ids=["unknown value", "unknown flag"])
def test_a_flag_the_installed_xla_refuses_is_a_one_line_warning_and_not_set(refused):
    child = subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", _REFUSED_PROGRAM, refused],
                           env=child_env(), capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["applied"] is False and result["xla_flags"] == user_xla_flags() and result["devices"] >= 1
    warning = [line for line in child.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warning) == 1 and f"the installed XLA refuses {refused} (" in warning[0], child.stderr[-3000:]
    assert "Unknown flag" in warning[0] or "Illegal value" in warning[0]  # XLA's own reason, quoted
