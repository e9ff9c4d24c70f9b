"""Where engines run: one resolver for device auto (explicit device, then accelerator_type, then Ray's
resources once Ray is up, then torch), and a GPU request refused at preflight, in one line naming the key,
only where no GPU can ever appear (the run's own local Ray on a machine without one); a cluster the run
connects to keeps waiting for its autoscaler. No engine loads in any of these tests."""

from __future__ import annotations

import pytest

from ctxforge import devices, raycluster
from ctxforge.cli import main
from ctxforge.config import PreflightError
from ctxforge.devices import resolve_device
from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.preflight import generator_backend


def _sees(monkeypatch, *, ray_up: bool, ray_gpus: float = 0, torch_gpu: bool = False, started_here: bool = True):
    """Make this process see Ray (up or not, listing `ray_gpus` GPUs, started here or joined) and torch."""
    import ray
    import torch

    monkeypatch.setattr(ray, "is_initialized", lambda: ray_up)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, **({"GPU": ray_gpus} if ray_gpus else {})})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_gpu)
    monkeypatch.setattr(raycluster, "started_here", lambda: ray_up and started_here)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize("device,accelerator,ray_up,ray_gpus,torch_gpu,expected", [
    ("cpu", None, True, 2, True, "cpu"),       # an explicit device wins over every GPU in sight
    ("cuda", None, False, 0, False, "cuda"),
    ("auto", "H100", True, 0, False, "cuda"),  # an accelerator type is a GPU request, before Ray's resources
    ("auto", None, True, 2, False, "cuda"),    # a CPU head with GPU workers: the engines go to the workers
    ("auto", None, True, 0, True, "cpu"),      # a GPU this driver sees but Ray does not offer holds no engine
    ("auto", None, False, 0, True, "cuda"),    # before Ray starts: torch (the local Ray will list that GPU)
    ("auto", None, False, 0, False, "cpu"),    # negative control: nothing anywhere
])
def test_auto_device_is_decided_in_one_order(monkeypatch, device, accelerator, ray_up, ray_gpus, torch_gpu, expected):
    _sees(monkeypatch, ray_up=ray_up, ray_gpus=ray_gpus, torch_gpu=torch_gpu)
    assert resolve_device(device, accelerator) == expected


def test_the_generator_and_serving_ask_the_same_resolver(monkeypatch, tmp_path):
    from ctxforge.generation.backends.vllm import VLLMBackend
    from ctxforge.serve.config import ServeConfig
    from ctxforge.serve.vllm_app import serving_device

    _sees(monkeypatch, ray_up=True, ray_gpus=1, torch_gpu=False)
    gen = VLLMBackend(GeneratorConfig(backend="vllm", model=str(tmp_path)), str(tmp_path))
    assert gen.device() == serving_device(ServeConfig(model=str(tmp_path), backend="vllm")) == "cuda"
    _sees(monkeypatch, ray_up=True, ray_gpus=0, torch_gpu=True)
    assert gen.device() == serving_device(ServeConfig(model=str(tmp_path), backend="vllm")) == "cpu"


@pytest.mark.parametrize("ray_up,ray_gpus,started_here,address,env,torch_gpu,expected", [
    (False, 0, True, None, None, False, False),          # the run's own local Ray on a machine without a GPU
    (True, 0, True, None, None, False, False),           # that local Ray already up, listing none
    (False, 0, True, "local", None, False, False),       # "local" is the embedded cluster too
    (False, 0, True, None, None, True, True),            # the local Ray will list this machine's GPU
    (True, 1, True, None, None, False, True),
    (True, 0, False, None, None, False, True),           # a cluster we joined: its autoscaler may add a GPU node
    (False, 0, True, "auto", None, False, True),         # runtime.address: a cluster to connect to
    (False, 0, True, None, "ray://head:10001", False, True),   # RAY_ADDRESS (ray job submit)
])
def test_a_gpu_cannot_appear_only_on_the_runs_own_local_cluster_without_one(
        monkeypatch, ray_up, ray_gpus, started_here, address, env, torch_gpu, expected):
    _sees(monkeypatch, ray_up=ray_up, ray_gpus=ray_gpus, torch_gpu=torch_gpu, started_here=started_here)
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert devices.gpu_can_appear(address) is expected


def test_started_here_tells_an_embedded_cluster_from_none(ray_local):
    assert raycluster.started_here()   # the fixture's ray.init(address="local") started its head here


# ---------------------------------------------------------------------------------------------------------
# the refusal, as a user sees it: one line from the command, before Ray (hence any engine) starts
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture()
def cpu_machine_before_ray(monkeypatch):
    """A fresh command on a machine without a GPU, no Ray up, no RAY_ADDRESS; starting Ray fails the test."""
    import ray

    _sees(monkeypatch, ray_up=False, torch_gpu=False)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started: the GPU request was not refused at preflight")

    monkeypatch.setattr(ray, "init", no_ray)


REFUSED = [
    (["synth", "--config", "tiny", "generator.device=cuda"], "ctxforge synth: generator.device=cuda: ",
     "use generator.device=auto or cpu"),
    (["synth", "--config", "tiny", "generator.device=cuda", "generator.backend=vllm"],
     "ctxforge synth: generator.device=cuda: ", "use generator.device=auto or cpu"),
    (["synth", "--config", "tiny", "generator.device=auto", "generator.backend=vllm", "generator.accelerator_type=H100"],
     "ctxforge synth: generator.accelerator_type='H100': ", "leave generator.accelerator_type unset"),
    (["lengthen", "--config", "lengthen-tiny", "generator.device=cuda"], "ctxforge lengthen: generator.device=cuda: ",
     "use generator.device=auto or cpu"),
    (["serve", "--config", "serve-tiny", "device=cuda"], "ctxforge serve: device=cuda: ", "use device=auto or cpu"),
    (["serve", "--config", "serve-tiny", "device=cuda", "backend=vllm"], "ctxforge serve: device=cuda: ",
     "use device=auto or cpu"),
    (["eval", "--config", "eval-tiny", "serve.device=cuda"], "ctxforge eval: serve.device=cuda: ",
     "use serve.device=auto or cpu"),
]


@pytest.mark.parametrize("argv,start,instead", REFUSED, ids=[" ".join(r[0][:1] + r[0][3:]) for r in REFUSED])
def test_a_gpu_request_no_gpu_can_answer_is_one_line_at_preflight(argv, start, instead, cpu_machine_before_ray,
                                                                  capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, f"output.dir={tmp_path / 'out'}"] if argv[0] != "serve" else argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("ctxforge ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(start) and instead in lines[0] and "RAY_ADDRESS" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_and_auto_pass_the_generator_and_serving_preflight(device, cpu_machine_before_ray):
    from ctxforge.serve.config import ServeConfig
    from ctxforge.serve.preflight import preflight_serve

    backend = generator_backend(GeneratorConfig(backend="hf", model="ctxforge:tiny", device=device, max_model_len=2048))
    assert backend.name == "hf"
    assert preflight_serve(ServeConfig(model="ctxforge:tiny", backend="hf", device=device))


def test_cuda_on_a_cluster_the_run_connects_to_passes_preflight(cpu_machine_before_ray):
    """An autoscaler may start a GPU node there: the pool's wait (and its warning) is the behaviour kept."""
    gen = GeneratorConfig(backend="hf", model="ctxforge:tiny", device="cuda", max_model_len=2048)
    with pytest.raises(PreflightError, match=r"^generator\.device=cuda: "):
        generator_backend(gen)
    assert generator_backend(gen, ray_address="ray://head:10001").name == "hf"
