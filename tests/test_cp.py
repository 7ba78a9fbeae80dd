"""Context parallelism (pipelines/parallel.py, actors/ray_pool.py's groups): one window predicted by a group
of workers that share its tokens gives the frames of one worker, for Ulysses and ring attention, for one or
two groups, and after a member is killed mid-run; what cannot be sharded is refused before anything starts."""

import os

import numpy as np
import pytest
import torch

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import Worker, WorkerSpec
from longtake.cluster.engine import prepare, run
from longtake.cluster.runtime import worker_plan
from longtake.request import RequestError


def _req(model, out, **kw) -> dict:
    return dict(prompt="a red ball moving right", negative_prompt="blurry", model=model, out=str(out), seconds=2,
                fps=16, steps=4, window=5, overlap=2, **kw)


@pytest.mark.parametrize("kw, field", [
    (dict(cp=2), "cp"),  # the AnimateDiff family has no context-parallel plan
    (dict(cp=9), "cp"),  # more than a node's GPUs
    (dict(cp=0), "cp"),
    (dict(cp=2, workers=3), "workers"),  # groups of 2
])
def test_a_group_the_model_cannot_have_is_refused_naming_the_field(tiny_model, kw, field):
    with pytest.raises(RequestError) as e:
        prepare(_req(tiny_model, "x.mp4", **kw))
    assert e.value.field == field and str(e.value.value) == str(kw[field])


def test_ulysses_needs_the_heads_to_divide_and_auto_takes_ring_then(tiny_wan_model):
    """tiny-wan has 2 heads: cp 4 is ring under auto, and refused when Ulysses is asked for."""
    with pytest.raises(RequestError) as e:
        prepare(_req(tiny_wan_model, "x.mp4", cp=4, cp_mode="ulysses"))
    assert e.value.field == "cp_mode" and "2 attention heads" in e.value.expected
    assert prepare(_req(tiny_wan_model, "x.mp4", cp=4)).cp_mode == "ring"
    assert prepare(_req(tiny_wan_model, "x.mp4", cp=2)).cp_mode == "ulysses"
    with pytest.raises(RequestError) as e:  # 5 latent frames x 4 x 4 patches (64 / 8 / 2): 80 tokens, not 3k
        prepare(_req(tiny_wan_model, "x.mp4", cp=3, height=64, width=64))
    assert e.value.field == "cp" and "80 tokens" in e.value.expected and "2, 4, 5, 8" in e.value.expected


def _transformer(family, path):
    import diffusers

    name = {"wan": "WanTransformer3DModel", "wan_animate": "WanAnimateTransformer3DModel"}[family]
    return getattr(diffusers, name).from_pretrained(path, subfolder="transformer").eval()


def _shard_forward(rank, family, path, port, inputs, results):
    import importlib

    from longtake.pipelines.parallel import Member, join_group

    torch.set_num_threads(1)
    join_group(Member(rank, 2, f"127.0.0.1:{port}"), "cpu", timeout_s=60)
    parallelize = importlib.import_module(f"longtake.pipelines.{family}").Backend._parallelize
    for mode in ("ulysses", "ring"):
        model = _transformer(family, path)
        parallelize(None, model, 2, mode)
        with torch.inference_mode():
            out = model(**inputs, return_dict=False)[0]
        if rank == 0:
            results[mode] = out.numpy()
    torch.distributed.destroy_process_group()


def _inputs(family):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 512, 32, generator=g)
    if family == "wan":
        return dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                    encoder_hidden_states=text)
    # Wan-Animate: the reference slot and 3 latent frames (4 frames: 2 each), their pose, a 9-frame face video
    return dict(hidden_states=torch.randn(1, 36, 4, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=text, encoder_hidden_states_image=torch.randn(1, 65, 16, generator=g),
                pose_hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g),
                face_pixel_values=torch.rand(1, 3, 9, 16, 16, generator=g) * 2 - 1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan", "wan_animate"])
def test_a_window_sharded_over_two_processes_equals_one(request, family):
    """The transformer alone, in two processes joined over gloo: Ulysses gives one process's output exactly
    (the same attention on whole heads), ring within float32 rounding (partial results merged by their
    log-sum-exp); every rank gets the whole output. Wan-Animate's own plan (each worker whole frames, its face
    adapters on their own frames): both within float32 rounding."""
    import socket

    import torch.multiprocessing as mp

    path = request.getfixturevalue({"wan": "tiny_wan_model", "wan_animate": "tiny_wan_animate_model"}[family])
    inputs = _inputs(family)
    with torch.inference_mode():
        alone = _transformer(family, path)(**inputs, return_dict=False)[0].numpy()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_shard_forward, args=(family, path, port, inputs, results), nprocs=2, start_method="spawn")
    assert results["ulysses"].shape == alone.shape
    if family == "wan":  # every layer sees the same rows as one process's
        assert np.array_equal(results["ulysses"], alone)
    else:  # the face adapters and linear layers run on half the frames: another GEMM blocking, same values
        assert np.abs(results["ulysses"] - alone).max() < 1e-5
    ring = np.abs(results["ring"] - alone).max()
    assert 0 < ring < 1e-5, ring  # ring attention ran (its rounding differs) and agrees


def _frames(pool, job):
    chunks = []
    result = run(job, pool, progress=False, on_frames=lambda first, f: chunks.append(f.copy()))
    return result, np.concatenate(chunks)


@pytest.fixture(scope="module")
def reference(tiny_wan_model, tmp_path_factory):
    """cp 1: the in-process frames every group must give."""
    pool = InProcessPool(WorkerSpec(tiny_wan_model))
    try:
        job = prepare(_req(tiny_wan_model, tmp_path_factory.mktemp("cp") / "ref.mp4"))
        assert len(job.windows) >= 3
        yield _frames(pool, job)
    finally:
        pool.shutdown()


def _on_groups(tmp_path, model, name, worker_cls=Worker, **kw):
    from longtake.actors.ray_pool import RayPool

    job = prepare(_req(model, tmp_path / f"{name}.mp4", **kw))
    spec, slots = worker_plan(job, gpus=0, cpus=4)
    pool = RayPool(spec, slots, worker_cls=worker_cls)
    try:
        assert pool.num_workers == slots and spec.cp == kw["cp"]
        return _frames(pool, job), pool.retries
    finally:
        pool.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("mode, workers", [("ulysses", 4), ("ring", 2)])
def test_groups_give_the_frames_of_one_worker(tmp_path, ray_session, tiny_wan_model, reference, mode, workers):
    """--cp 2 on Ray: two groups (4 workers) or one (2), Ulysses or ring: the frames of --cp 1 within one
    uint8 level (Ulysses: the same). One Ulysses group is the killed-member test's."""
    ref, ref_frames = reference
    (res, frames), _ = _on_groups(tmp_path, tiny_wan_model, mode, cp=2, cp_mode=mode, workers=workers)
    assert res.workers == workers and res.cp == 2
    assert frames.shape == ref_frames.shape
    assert np.abs(frames.astype(int) - ref_frames).max() <= 1
    if mode == "ulysses":
        assert res.frames_sha256 == ref.frames_sha256


def member_dies_once(marker):
    """A worker class whose rank-1 member exits in the middle of a later window's prediction, once."""

    class MemberDiesOnce(Worker):
        def predict(self, z, t, cond, start, end, guidance):
            if self.member is not None and self.member.rank == 1 and start > 0 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return super().predict(z, t, cond, start, end, guidance)

    return MemberDiesOnce


@pytest.mark.slow
def test_a_member_killed_mid_run_changes_no_frame(tmp_path, ray_session, tiny_wan_model, reference):
    """One Ulysses group of 2: the dead member breaks it, the leader exits, the pool starts a new group and
    retries the window: the frames of --cp 1."""
    ref, _ = reference
    marker = tmp_path / "died"
    (res, _), retries = _on_groups(tmp_path, tiny_wan_model, "killed", worker_cls=member_dies_once(str(marker)),
                                   cp=2, workers=2)
    assert marker.exists() and retries >= 1
    assert res.frames_sha256 == ref.frames_sha256


@pytest.mark.parametrize("args, says", [
    (["--cp", "2", "--in-process"], "cp: got 2, expected 1 in this process"),
    (["--cp", "2", "--cp-mode", "diagonal"], "cp_mode: got 'diagonal', expected one of 'auto', 'ulysses' or 'ring'"),
    (["--cp", "2", "--workers", "3"], "workers: got 3, expected a multiple of cp (2)"),
])
def test_the_cli_says_what_is_wrong_with_a_group_and_exits_2(tiny_wan_model, tmp_path, capsys, args, says):
    from longtake.cli import main

    try:
        code = main(["render", "a ball", "--model", tiny_wan_model, "--out", str(tmp_path / "x.mp4"), *args])
    except SystemExit as e:  # argparse's own exit (a choice it refuses)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()



def test_a_server_checks_its_group_size_before_it_starts(tiny_model, tiny_wan_model, tmp_path, capsys):
    """`longtake serve --cp K`: out of range, or a model without a plan, is refused before Ray starts."""
    from longtake.cli import main
    from longtake.serve.limits import Limits

    with pytest.raises(RequestError) as e:
        Limits(cp=9)
    assert e.value.field == "cp"
    assert main(["serve", "--model", tiny_model, "--cp", "2", "--data-dir", str(tmp_path / "d")]) == 2
    assert "cp: got 2, expected 1: the animatediff family has no context-parallel plan" in capsys.readouterr().err
    from longtake.actors.serve_pool import denoiser_spec

    spec = denoiser_spec(tiny_wan_model, "cpu", 2)
    assert (spec.cp, spec.cp_mode) == (2, "ulysses")  # the replica's group attends as auto chooses


def _animate_req(path, out, **kw) -> dict:
    return _req(path, out, pose=f"{path}/pose.json", reference=f"{path}/photo.png", **kw)


def test_wan_animate_groups_hold_whole_frames(tiny_wan_animate_model):
    """A Wan-Animate window goes through the transformer with its reference slot (5 + 1 latent frames): a
    group of 2 or 3 holds whole frames, one of 4 cannot and is refused naming cp."""
    assert prepare(_animate_req(tiny_wan_animate_model, "x.mp4", cp=2)).cp_mode == "ulysses"
    assert prepare(_animate_req(tiny_wan_animate_model, "x.mp4", cp=3)).cp_mode == "ring"
    with pytest.raises(RequestError) as e:
        prepare(_animate_req(tiny_wan_animate_model, "x.mp4", cp=4))
    assert e.value.field == "cp" and "6 latent frames" in e.value.expected and "whole frames" in e.value.expected


@pytest.mark.slow
def test_a_wan_animate_group_gives_the_frames_of_one_worker(tmp_path, ray_session, tiny_wan_animate_model):
    pool = InProcessPool(WorkerSpec(tiny_wan_animate_model))
    try:
        ref, ref_frames = _frames(pool, prepare(_animate_req(tiny_wan_animate_model, tmp_path / "ref.mp4")))
    finally:
        pool.shutdown()
    (res, frames), _ = _on_groups(tmp_path, tiny_wan_animate_model, "animate", cp=2, workers=2,
                                  pose=f"{tiny_wan_animate_model}/pose.json",
                                  reference=f"{tiny_wan_animate_model}/photo.png")
    assert res.cp == 2 and frames.shape == ref_frames.shape
    assert np.abs(frames.astype(int) - ref_frames).max() <= 1  # float32 rounding at most (the test above)
