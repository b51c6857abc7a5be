"""Several-device suite (issue 16): DDP correctness and scaling, FSDP at the real size.

    python -m benchmarks.distributed all --preset gpu --out benchmarks/results   # two H200s
    python -m benchmarks.distributed all --preset toy --out /tmp/dist            # CPU, gloo
    (``run`` writes ``<work>/distributed_raw.json``, ``report`` turns it into the tables;
    ``--parts ddp_curves ddp_eval ddp_scaling fsdp memory fsdp_cli`` picks parts)

Parts, with wall times on two H200s (3c1da1b: ``wan1.3b`` built on the GPU, about 40 s a
launch; a377d7d built it on the host, ~95 s). One call to the device allows 10 minutes, so run
the parts in separate calls; ``--only LABEL...`` keeps the scaling, fsdp and memory cases whose
label holds one of them (``--only 17x480x832``):

* ``ddp_curves`` (5-7 min on a fresh machine, data generation included). The real UniViGU
  module and SyntheticDataModule (``in_memory``) train the synthetic world at 16x32x32 with
  ``small``, through Lightning's Trainer, from the same seed: 2 ranks at batch B/2 and 1 rank at
  batch B. The in-memory stream cuts each seeded epoch permutation into batch-sized chunks and
  gives rank r every R-th chunk. At step s the two ranks read chunks 2s and 2s+1 of the
  permutation: together exactly the B clips that the 1-rank run reads at step s. The per-sample
  noise differs (the step generator is seeded by rank), so the curves agree within noise, not
  bit for bit.
  Reported:
  - the per-step relative difference (max, mean, median) and the difference of the mean loss
    over the last half;
  - the same four numbers for a noise floor: a second 1-rank run that differs only in its
    per-step randomness (module seed 1);
  - the clips that both ranks read within one epoch (must be 0).
* ``ddp_eval`` (1.5 min after ``ddp_curves``): ``validate`` with :class:`callbacks.Evaluation`
  on the whole validation split (``eval_clips``), on 1 rank and on 2, from the weights that the
  ``ddp_curves`` 1-rank run keeps (random weights without it). One row per metric, with both
  numbers.
* ``ddp_scaling``: examples/s on 2 ranks vs 1 at the same per-rank batch, timed steps after
  warm-up.
  - ``small`` on 16x64x64 clips at batch 64 per rank;
  - ``wan1.3b`` (random weights, 3.05B parameters with the caption stream) on Wan VAE latents of
    17x480x832 clips ``(16, 5, 60, 104)`` at batch 1 per rank, bf16, gradient checkpointing.
  Target >= 1.8x.
* ``fsdp`` (the 17-frame case alone: about 6 min, most of it writing and reading the 34 GiB
  checkpoints; run the 81-frame case in another call). ``wan1.3b`` with
  AdamW, bf16, full sharding over 2 ranks and gradient checkpointing, at 81x480x832 and
  17x480x832: per-rank peak memory and step time. At 17 frames:
  - the run writes a sharded checkpoint half-way;
  - a second run resumes from it, and its next losses are compared with the uninterrupted run's
    (same batches, same per-step randomness);
  - the checkpoint is consolidated into one file
    (``lightning.pytorch.utilities.consolidate_checkpoint``);
  - both are read back with :func:`lightning_vigu.export.read_checkpoint`, and the file is
    loaded by :func:`lightning_vigu.cli.load_module`, as ``generate`` and ``caption`` load it
    (with the module's tokenizer, codec and prompt encoder passed again: built in Python, they
    are not in the checkpoint).
* ``memory`` (40-60 s a launch, eight launches): what fits on 1 vs 2 GPUs for ``wan1.3b`` at
  batch 1: full training, refine with the video path frozen, LoRA. One GPU at 81 and 17
  frames; FSDP over two at 81 (the README's table).
* ``fsdp_cli`` (~2 min): the user's path through the command line. ``fit -c conf/recall.yaml
  -c conf/fsdp.yaml --trainer.devices=2`` with the tiny model, the last sharded checkpoint
  consolidated, then ``generate --ckpt`` and ``caption --ckpt`` on the consolidated file. The
  toy preset runs it with ``conf/ddp.yaml`` on CPU.

Every case runs in fresh processes: one per rank, forked by ``torch.multiprocessing`` from a
server that imported this module once and never touches CUDA (a spawned rank spent ~8 s of a
2-core CPU importing torch and Lightning). Lightning is told the ranks by ``LOCAL_RANK`` /
``WORLD_SIZE``, as torchrun would tell it. Every launch sets
``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NVSHMEM_DISABLE_NVLS=1``.
A failing case becomes a row with its error. The toy preset runs on CPU with gloo; Lightning's
FSDPStrategy refuses the CPU accelerator, so the toy's ``fsdp`` part runs the same
train / checkpoint / resume / read path under DDP (sharding and consolidation are GPU-only).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import ROOT, markdown_table, run_then_report, write_results
from benchmarks.flops import failure
from lightning_vigu.batch import collate_batch
from lightning_vigu.codecs.base import LatentCodec
from lightning_vigu.text.tokenizers import CaptionTokenizer

RAW_NAME = "distributed_raw.json"
PARTS = ("ddp_curves", "ddp_eval", "ddp_scaling", "fsdp", "memory", "fsdp_cli")
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass
class Case:
    """One training launch: model size, clip shape, per-rank batch, steps, strategy."""

    label: str
    size: str
    video: tuple[int, int, int]  # frames, height, width of the clips
    batch: int  # per rank
    steps: int
    warmup: int = 1  # steps left out of the timing
    world: str = "cpu"  # synthetic world preset (sizes other than wan1.3b)
    strategy: str = "ddp"  # ddp or fsdp
    checkpointing: bool = False
    num_train: int = 0  # clips of the synthetic world in memory (ddp_curves), 0: random clips
    save_at: int = 0  # write a checkpoint after this step (fsdp resume check)
    resume: str = ""  # checkpoint to resume from
    seed: int = 0  # the module's per-step randomness (times, noise); the weights are seed 0's
    phase: str = "recall"  # refine_frozen: the video path frozen
    lora: dict | None = None  # adapters on the video path (conf/lora.yaml)
    evaluate: int = 0  # validate on this many validation clips (callbacks.Evaluation), no training
    weights: str = ""  # a checkpoint of this suite whose weights the launch starts from
    extra: dict = field(default_factory=dict)


def wan_memory_cases() -> list[tuple[int, Case]]:
    """``(ranks, case)``: ``wan1.3b`` (bf16, AdamW, gradient checkpointing) at batch 1 for full
    training, refine with the video path frozen, and LoRA (rank 64): on one GPU at 17 and 81
    frames, and fully sharded over two at 81 (full training over two: the ``fsdp`` part)."""
    kinds = {
        "full": {},
        "refine_frozen": {"phase": "refine_frozen"},
        "lora": {"lora": {"rank": 64, "alpha": 64}},
    }
    cases = []
    for ranks, strategy, frames in ((1, "ddp", 81), (2, "fsdp", 81), (1, "ddp", 17)):
        for what, kw in kinds.items():
            if ranks == 1 or what != "full":
                label, video = f"{what} {frames}x480x832", (frames, 480, 832)
                case = Case(label, "wan1.3b", video, 1, 5, 2, "", strategy, True, **kw)
                cases.append((ranks, case))
    return cases


PRESETS = {
    "gpu": dict(
        accelerator="gpu",
        curves=Case("small 16x32x32", "small", (16, 32, 32), 64, 300, num_train=4096),
        scaling=[
            Case("small 16x64x64", "small", (16, 64, 64), 64, 60, warmup=20, world="gpu"),
            Case("wan1.3b 17x480x832", "wan1.3b", (17, 480, 832), 1, 12, 4, checkpointing=True),
        ],
        fsdp=[
            Case("81x480x832", "wan1.3b", (81, 480, 832), 1, 6, 2, "", "fsdp", True),
            Case("17x480x832", "wan1.3b", (17, 480, 832), 1, 10, 2, "", "fsdp", True, save_at=5),
        ],
        fsdp_cli=["-c", "conf/fsdp.yaml", "--trainer.accelerator=gpu", "--trainer.max_steps=40"],
        eval_clips=128,
        memory=wan_memory_cases(),
    ),
    "toy": dict(
        accelerator="cpu",
        # 12 steps: the per-step losses of a fresh model are heavy-tailed, so the test compares
        # medians, and a median of 4 steps is two draws
        curves=Case("tiny 16x32x32", "tiny", (16, 32, 32), 4, 12, num_train=32),
        scaling=[Case("tiny 16x32x32", "tiny", (16, 32, 32), 2, 4, warmup=1)],
        fsdp=[Case("tiny 16x32x32", "tiny", (16, 32, 32), 2, 4, 1, "cpu", "fsdp", save_at=2)],
        fsdp_cli=["-c", "conf/ddp.yaml", "--trainer.accelerator=cpu", "--trainer.max_steps=4"],
        eval_clips=8,
        memory=[
            (1, Case("lora tiny", "tiny", (16, 32, 32), 2, 3, 1, lora={"rank": 4, "alpha": 4}))
        ],
    ),
}


# ---------------------------------------------------------------------------- one rank
class WanLatentGeometry(LatentCodec):
    """The Wan VAE's latent space (16 channels, 4x8x8 down-sampling, ``T = 4n + 1`` frames)
    without its weights: the benchmark's batches carry random latents."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_channels, self.factors = 16, (4, 8, 8)

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.factors[0] + 1

    def video_frames(self, latent_frames: int) -> int:
        return self.factors[0] * (latent_frames - 1) + 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        raise ValueError("WanLatentGeometry holds no VAE; batches must carry 'latents'")


class WordIds(CaptionTokenizer):
    """umT5's vocabulary size (256,384 ids, as the Uni-ViGU release) without its files: each
    word hashed to an id, for random-weight runs at the real parameter count."""

    vocab_size, eos_id = 256_384, 1

    def _encode_one(self, text: str) -> list[int]:
        return [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.split()]

    def _decode_ids(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


class RandomClips(Dataset):
    """``num`` training samples, sample ``i`` a fixed function of ``i``: Wan latents and prompt
    embeddings ``(16, t, h, w)`` / ``(512, 4096)`` drawn from seed ``i`` for ``wan1.3b``, else
    clip ``i % 64`` of the synthetic world preset ``case.world``."""

    def __init__(self, case: Case, num: int) -> None:
        self.case, self.num = case, num
        if case.size != "wan1.3b":
            from benchmarks.train_loop import clips

            self.videos, self.records = clips(case.world, 64)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict:
        if self.case.size != "wan1.3b":
            r = self.records[i % 64]
            return {"video": self.videos[i % 64], "prompt": r["prompt"], "caption": r["caption"], "key": str(i)}  # fmt: skip
        g = torch.Generator().manual_seed(i)
        t, h, w = self.case.video
        latents = torch.randn(16, (t - 1) // 4 + 1, h // 8, w // 8, generator=g)  # (16, t, h, w)
        words = " ".join(f"w{n}" for n in torch.randint(0, 1000, (200,), generator=g).tolist())
        emb = torch.randn(512, 4096, generator=g) * 0.1  # (L, text_dim), umT5's sizes
        return {"latents": latents, "prompt_emb": emb, "prompt": "", "caption": words, "key": str(i)}  # fmt: skip


def injected_parts(case: Case, out: Path, rank: int) -> dict:
    """The codec, tokenizer and prompt encoder of :func:`build_module` (built in Python, so its
    checkpoints do not hold them: loading passes them again)."""
    from datamodules.synthetic import WorldTokenizer
    from lightning_vigu.text.encoders import PrecomputedPromptEncoder

    if case.size != "wan1.3b":
        return {"tokenizer": WorldTokenizer()}
    empty = out / f"empty_prompt_emb{rank}.pt"
    if not empty.is_file():
        torch.save(torch.zeros(512, 4096, device="cpu"), empty)
    return {
        "codec": WanLatentGeometry(),
        "tokenizer": WordIds(),
        "prompt_encoder": PrecomputedPromptEncoder(str(empty)),
    }


def build_module(case: Case, out: Path, rank: int):
    """UniViGU as ``conf/gpu.yaml`` (world sizes) or ``conf/model/wan1.3b.yaml`` (random
    weights, latents in, Wan's vocabulary) set it up, from seed 0."""
    from lightning_vigu.module import UniViGU
    from lightning_vigu.objective import ObjectiveConfig

    torch.manual_seed(0)
    common = dict(
        size=case.size,
        phase=case.phase,
        seed=case.seed,
        lora=case.lora,
        video_shape=case.video,
        gradient_checkpointing=case.checkpointing,
        warmup_steps=max(case.steps // 6, 1),
        **injected_parts(case, out, rank),
    )
    if case.size != "wan1.3b":
        return UniViGU(
            **common,
            caption_length=64,
            prompt_length=32,
            model_overrides={"text_absolute_positions": True},
            objective=ObjectiveConfig(prediction="data", time_shift=3.0),
            lr=5e-4,
        )
    return UniViGU(**common, caption_length=256, lr=5e-5)


class StepRecorder(L.Callback):
    """Per step of this rank: global step, loss, sample keys and end time; written to
    ``<out>/rank<N>.json`` at the end with the peak memory. Saves a checkpoint after step
    ``save_at`` (every rank takes part: FSDP writes its shards)."""

    def __init__(self, out: Path, params: int, save_at: int) -> None:
        self.out, self.params, self.save_at = out, params, save_at
        self.record = {"steps": [], "losses": [], "keys": [], "end_times": []}

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():  # the training regime, not the model's build and wrapping
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.record["losses"].append(float(loss))  # waits for the step
        self.record["end_times"].append(time.perf_counter())
        self.record["steps"].append(trainer.global_step - 1)
        self.record["keys"].append(list(batch["key"]))
        if self.save_at and trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.out / "sharded.ckpt")

    def on_train_end(self, trainer, pl_module) -> None:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        record = {**self.record, "rank": trainer.global_rank, "params": self.params}
        path = self.out / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({**record, "peak_gib": peak}))


def _strategy(case: Case, ranks: int, cuda: bool):
    if case.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp import MixedPrecision

        from lightning_vigu.model import UnifiedBlock

        return FSDPStrategy(
            sharding_strategy="FULL_SHARD",
            auto_wrap_policy={UnifiedBlock},
            mixed_precision=MixedPrecision(torch.bfloat16, torch.float32) if cuda else None,
            state_dict_type="sharded",
            use_orig_params=True,
        )
    return "ddp" if ranks > 1 else "auto"


def _trainer(case: Case, spec: dict, **kwargs) -> L.Trainer:
    """The launch's Trainer on its ranks: bf16 on GPUs, no logger, no progress bars."""
    cuda = spec["accelerator"] == "gpu"
    return L.Trainer(
        accelerator=spec["accelerator"],
        devices=spec["ranks"],
        strategy=_strategy(case, spec["ranks"], cuda),
        precision="bf16-mixed" if cuda else "32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=spec["out"],
        **kwargs,
    )


def train_rank(index: int, spec: dict) -> None:
    """One rank of a launch (a fresh process): Lightning's Trainer on the case."""
    ranks, out = spec["ranks"], Path(spec["out"])
    os.environ.update(spec["env"])  # the launcher's, not the fork server's (started earlier)
    os.environ.update(LOCAL_RANK=str(index), RANK=str(index), WORLD_SIZE=str(ranks), NODE_RANK="0")
    cuda = spec["accelerator"] == "gpu"
    if not cuda:
        torch.set_num_threads(1)
    names = Case.__dataclass_fields__
    case = Case(**{k: v for k, v in spec.items() if k in names})
    case.video = tuple(case.video)
    # built on its GPU: initialising 3B parameters on the host took ~80 s of every launch
    with torch.device(f"cuda:{index}" if cuda else "cpu"):
        module = build_module(case, out, index)
    params = sum(p.numel() for p in module.parameters())
    if case.weights:  # the suite's own checkpoint: trusted
        state = torch.load(case.weights, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    if case.evaluate:
        return evaluate_rank(module, case, spec, out)
    if case.num_train:  # the real synthetic world, decoded into memory
        data = dict(datamodule=world_datamodule(case, out.parent / "cache"))
    else:
        loader = DataLoader(
            # an epoch ends at the checkpoint, every epoch the same batches: a resumed run
            # reads what the uninterrupted one reads after the checkpoint
            RandomClips(case, case.batch * ranks * (case.save_at or case.steps)),
            batch_size=case.batch,
            collate_fn=collate_batch,
            num_workers=2 if cuda else 0,
        )
        data = dict(train_dataloaders=loader)
    trainer = _trainer(
        case,
        spec,
        callbacks=[StepRecorder(out, params, case.save_at)],
        max_steps=case.steps,
        gradient_clip_val=None if case.strategy == "fsdp" else 1.0,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    # the checkpoint is this suite's own: its pickled hyper-parameters are trusted
    trainer.fit(module, **data, ckpt_path=case.resume or None, weights_only=False)


def evaluate_rank(module, case: Case, spec: dict, out: Path) -> None:
    """``validate`` with :class:`callbacks.Evaluation` on the world's whole validation split
    (``case.evaluate`` clips over all ranks); writes ``<out>/rank<N>.json`` with the numbers
    this rank reports."""
    from callbacks import Evaluation

    steps = case.extra.get("eval_steps")
    evaluation = Evaluation(every_n_steps=0, num_videos=case.evaluate, batch_size=16, steps=steps)
    trainer = _trainer(case, spec, callbacks=[evaluation])
    trainer.validate(module, datamodule=world_datamodule(case, out.parent / "cache"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    record = {"rank": trainer.global_rank, "metrics": metrics}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def world_datamodule(case: Case, cache: Path):
    """The synthetic world in memory: the training split, batches of ``case.batch`` per rank;
    with ``case.evaluate`` also that many validation clips."""
    from datamodules import SyntheticDataModule

    return SyntheticDataModule(
        preset=case.world,
        num_train=case.num_train,
        num_val=case.evaluate,
        num_test=0,
        num_unseen=0,
        batch_size=case.batch,
        num_workers=0,
        cache_dir=str(cache),
        in_memory=True,
        progress=False,
    )


def prepare_world(case: Case, cache: Path) -> None:
    """Generate the synthetic clips once, before the ranks start."""
    world_datamodule(case, cache).prepare_data()


# ---------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case: Case, ranks: int, accelerator: str, out: Path, timeout: float = 900) -> list[dict]:
    """Train ``case`` on ``ranks`` fresh processes; returns each rank's record
    (:class:`StepRecorder`), raising with the first error."""
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(NO_MULTICAST)  # handed to the ranks (and NCCL in them) with the spec
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    spec = {**asdict(case), "ranks": ranks, "accelerator": accelerator, "out": str(out)}
    spec["env"] = dict(os.environ)
    # ranks fork from a server that imported this module once (torch and Lightning take ~8 s
    # to import on 2 cores); the server never touches CUDA, so each rank starts its own
    mp.set_forkserver_preload(["benchmarks.distributed"])  # also when run as __main__
    ctx = mp.start_processes(
        train_rank, args=(spec,), nprocs=ranks, join=False, start_method="forkserver"
    )
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                raise TimeoutError(f"'{case.label}' on {ranks} rank(s) ran past {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def _attempt(row: dict, fn) -> dict:
    try:
        row.update(fn())
    except Exception as exn:  # a failed case is a row with its error, not a crash
        lines = [line for line in str(exn).splitlines() if line.strip()]
        row["error"] = failure(exn) if len(lines) < 2 else lines[-1][:200]  # a rank's traceback
    print({k: v for k, v in row.items() if not isinstance(v, list)}, flush=True)
    return row


def _timing(records: list[dict], case: Case) -> dict:
    """Steps/s, examples/s over all ranks and peak memory, after the warm-up steps."""
    times = np.diff(records[0]["end_times"])
    if case.save_at:  # the interval after the checkpoint's step includes writing it
        times = np.delete(times, case.save_at - 1)
    times = times[case.warmup :]
    seconds = float(times.mean())
    return {
        "seconds": seconds,
        "steps_per_s": 1 / seconds,
        "examples_per_s": case.batch * len(records) / seconds,
        "peak_gib": max(r["peak_gib"] for r in records),
        "params_b": records[0]["params"] / 1e9,
    }


# ---------------------------------------------------------------------------- parts
def _rel(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-step relative difference of two loss curves (max, mean, median) and of their late
    means. The median is the one that a single step's outlier does not move: early in training
    a step's loss is heavy-tailed (the x-prediction's velocity and the caption KL weight grow
    as their times near their ends), so one draw can multiply it."""
    rel = np.abs(a - b) / np.abs(b)
    late = slice(len(b) // 2, None)
    return {
        "max": float(rel.max()),
        "mean": float(rel.mean()),
        "median": float(np.median(rel)),
        "late_mean": float(abs(a[late].mean() - b[late].mean()) / b[late].mean()),
    }


def ddp_curves(preset: dict, work: Path) -> list[dict]:
    """The same seed on 2 ranks at B/2 and on 1 rank at B: losses, their difference, overlap.
    The noise floor: 1 rank at B again with other per-step randomness (same weights, same
    batches), against the first 1-rank run."""
    case = preset["curves"]
    prepare_world(case, work / "cache")
    half = replace(case, batch=case.batch // 2)
    reseeded = replace(case, seed=1)
    row = {"case": case.label, "batch": case.batch, "steps": case.steps}

    def run() -> dict:
        accelerator = preset["accelerator"]
        two = launch(half, 2, accelerator, work / "curves_2")
        kept = replace(case, save_at=case.steps)  # weights for ddp_eval
        one = launch(kept, 1, accelerator, work / "curves_1")
        other = launch(reseeded, 1, accelerator, work / "curves_1_seed1")
        loss_two = np.mean([r["losses"] for r in two], axis=0)  # equal halves: the global mean
        loss_one = np.asarray(one[0]["losses"])
        loss_other = np.asarray(other[0]["losses"])
        ranks_vs_one, floor = _rel(loss_two, loss_one), _rel(loss_other, loss_one)
        # within an epoch the ranks read disjoint clips (every clip is read once per epoch)
        per_epoch = case.num_train // case.batch
        overlap = 0
        for epoch in range(case.steps // per_epoch + 1):
            steps = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
            a, b = ({k for keys in r["keys"][steps] for k in keys} for r in two)
            overlap += len(a & b)
        union = [sorted(a + b) for a, b in zip(two[0]["keys"], two[1]["keys"])]
        return {
            "losses_2ranks": loss_two.tolist(),
            "losses_1rank": loss_one.tolist(),
            "losses_1rank_seed1": loss_other.tolist(),
            **{f"{k}_rel_diff": v for k, v in ranks_vs_one.items()},
            **{f"floor_{k}_rel_diff": v for k, v in floor.items()},
            "rank_overlap_per_epoch": overlap,
            "same_batches_as_1rank": union == [sorted(k) for k in one[0]["keys"]],
        }

    return [_attempt(row, run)]


def ddp_eval(preset: dict, work: Path) -> list[dict]:
    """``validate`` with the Evaluation callback on the whole validation split, on 1 rank and on
    2, from the weights of the ``ddp_curves`` 1-rank run (random weights when it has not run):
    one row per metric with both numbers."""
    kept = work / "curves_1" / "sharded.ckpt"
    case = replace(
        preset["curves"],
        steps=0,
        evaluate=preset["eval_clips"],
        weights=str(kept) if kept.is_file() else "",
        extra={"eval_steps": 2} if preset["accelerator"] == "cpu" else {},  # toy: quick sampling
    )
    prepare_world(case, work / "cache")
    weights = f"ddp_curves 1-rank run, {preset['curves'].steps} steps" if case.weights else "random"

    def run() -> dict:
        one = launch(case, 1, preset["accelerator"], work / "eval_1")
        two = launch(case, 2, preset["accelerator"], work / "eval_2")
        return {"runs": [[r["metrics"] for r in one], [r["metrics"] for r in two]]}

    attempt = _attempt({"metric": "all", "weights": weights}, run)
    if "error" in attempt:
        return [attempt]
    (one,), two = attempt["runs"]
    rows = []
    for key in sorted(one):
        values = [metrics.get(key, float("nan")) for metrics in two]
        rows.append(
            {
                "metric": key,
                "weights": weights,
                "1_rank": one[key],
                "2_ranks": values[0],
                "abs_diff": abs(values[0] - one[key]),
                "ranks_agree": len(set(values)) == 1,
            }
        )
    print(
        f"ddp_eval: {len(rows)} metrics, max abs diff {max((r['abs_diff'] for r in rows), default=0):.3g}"
    )
    return rows


def ddp_scaling(preset: dict, work: Path) -> list[dict]:
    """Examples/s on 2 ranks vs 1 at the same per-rank batch."""
    rows = []
    for i, case in enumerate(preset["scaling"]):
        base = None
        for ranks in (1, 2):
            row = {"case": case.label, "ranks": ranks, "batch_per_rank": case.batch}
            out = work / f"scaling{i}_{ranks}"

            def run(case=case, ranks=ranks, out=out) -> dict:
                return _timing(launch(case, ranks, preset["accelerator"], out), case)

            rows.append(_attempt(row, run))
            if ranks == 1:
                base = row.get("examples_per_s")
            elif base and "examples_per_s" in row:
                row["speedup"] = row["examples_per_s"] / base
    return rows


def _consolidate(folder: Path, parts: dict) -> dict:
    """Consolidate a sharded checkpoint into one file and read both back; the file is then
    loaded as ``generate`` and ``caption`` load it, with the module's injected ``parts``."""
    from lightning_vigu.cli import load_module
    from lightning_vigu.export import read_checkpoint

    if folder.is_file():  # a DDP checkpoint (toy preset): nothing to consolidate
        read_checkpoint(folder, trust_pickle=True).model()
        load_module(str(folder), device="cpu", trust_pickle=True, **parts)
        return {"consolidated_equals_sharded": "n/a (DDP file)", "loads_for_sampling": True}
    target = folder.with_suffix(".consolidated.ckpt")
    cmd = [sys.executable, "-m", "lightning.pytorch.utilities.consolidate_checkpoint", str(folder)]
    done = subprocess.run(
        [*cmd, "--output_file", str(target)], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"consolidation failed: {done.stderr[-500:]}")
    sharded = read_checkpoint(folder, trust_pickle=True)
    single = read_checkpoint(target, trust_pickle=True)
    same = sharded.state.keys() == single.state.keys() and all(
        torch.equal(sharded.state[k], single.state[k]) for k in single.state
    )
    single.model()  # every tensor checked against the config
    load_module(str(target), device="cpu", trust_pickle=True, **parts)
    return {
        "consolidated_gib": target.stat().st_size / 2**30,
        "consolidated_params_b": sum(v.numel() for v in single.state.values()) / 1e9,
        "consolidated_equals_sharded": same,
        "consolidated_step": single.step,
        "loads_for_sampling": True,
    }


def _per_step(records: list[dict]) -> dict[int, float]:
    """``global step -> loss`` averaged over the ranks."""
    steps: dict[int, list[float]] = {}
    for r in records:
        for step, loss in zip(r["steps"], r["losses"]):
            steps.setdefault(step, []).append(loss)
    return {step: float(np.mean(v)) for step, v in steps.items()}


def fsdp(preset: dict, work: Path) -> list[dict]:
    """Full sharding on 2 ranks: memory and step time; checkpoint, resume, consolidate."""
    rows = []
    for i, case in enumerate(preset["fsdp"]):
        out = work / f"fsdp{i}"
        row = {"case": case.label, "size": case.size, "ranks": 2, "batch_per_rank": case.batch}
        if preset["accelerator"] == "cpu":  # Lightning's FSDPStrategy requires a GPU
            case = replace(case, strategy="ddp")
            row["strategy"] = "ddp (FSDP needs a GPU)"
        else:
            row["strategy"] = "fsdp"

        def run(case=case, out=out) -> dict:
            first = launch(case, 2, preset["accelerator"], out / "uninterrupted")
            result = _timing(first, case)
            if not case.save_at:
                return result
            ckpt = out / "uninterrupted" / "sharded.ckpt"
            resumed = replace(case, resume=str(ckpt))
            second = launch(resumed, 2, preset["accelerator"], out / "resumed")
            one, two = _per_step(first), _per_step(second)
            diffs = [abs(two[s] - one[s]) / abs(one[s]) for s in two]
            result.update(resumed_steps=sorted(two), resume_max_rel_diff=float(max(diffs)))
            print({"case": case.label, **result}, flush=True)  # kept if consolidation runs long
            result.update(_consolidate(ckpt, injected_parts(case, out, 0)))
            return result

        rows.append(_attempt(row, run))
    return rows


def memory(preset: dict, work: Path) -> list[dict]:
    """What fits: per-rank peak memory and step time of full training, refine with the video
    path frozen and LoRA, on one GPU and sharded over two (the README's table)."""
    rows = []
    for i, (ranks, case) in enumerate(preset["memory"]):
        strategy = "fsdp" if case.strategy == "fsdp" and preset["accelerator"] == "gpu" else "ddp"
        case = replace(case, strategy=strategy)
        row = {"case": case.label, "ranks": ranks, "strategy": strategy if ranks > 1 else "-"}

        def run(case=case, ranks=ranks, out=work / f"memory{i}") -> dict:
            records = launch(case, ranks, preset["accelerator"], out)
            return _timing(records, case)

        rows.append(_attempt(row, run))
    return rows


def fsdp_cli(preset: dict, work: Path) -> list[dict]:
    """A user's run end to end through the command line: ``fit`` of the tiny synthetic recall on
    2 ranks (FSDP on GPUs, DDP on CPU), its sharded checkpoint consolidated, then ``generate``
    and ``caption`` on the consolidated file."""
    run_dir = (work / "cli").resolve()  # the commands run in the repository (its conf/)
    row = {"case": "tiny recall via CLI", "ranks": 2, "overlay": preset["fsdp_cli"][1]}

    def cli(*args: str) -> str:
        cache = (work / "cache").resolve()
        env = {**os.environ, **NO_MULTICAST, "LIGHTNING_VIGU_CACHE": str(cache)}
        cmd = [sys.executable, "-m", "lightning_vigu", *args]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"'{' '.join(args[:1])}' failed: {done.stderr[-600:]}")
        return done.stdout

    def run() -> dict:
        data = dict(num_train=256, num_val=8, num_test=0, num_unseen=0, batch_size=8, num_workers=0, progress=False)  # fmt: skip
        checkpoints = run_dir / "checkpoints"
        callback = (
            "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
            f"{{dirpath: {checkpoints}, save_last: true}}}}]"
        )
        start = time.perf_counter()
        cli(
            "fit", "-c", "conf/recall.yaml", *preset["fsdp_cli"], "--trainer.devices=2",
            f"--trainer.default_root_dir={run_dir}", f"--trainer.callbacks={callback}",
            "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
            *(f"--data.init_args.{k}={v}" for k, v in data.items()),
        )  # fmt: skip
        fit_s = time.perf_counter() - start
        last = checkpoints / "last.ckpt"
        result = {"fit_s": fit_s, "checkpoint": "folder of shards" if last.is_dir() else "file"}
        if last.is_dir():
            result.update(_consolidate(last, {}))  # built by fit's config
            last = last.with_suffix(".consolidated.ckpt")
        samples = run_dir / "samples"
        prompt = "a red circle moves to the left"
        cli("generate", "--ckpt", str(last), "--prompts", prompt, "--out", str(samples))
        videos = sorted(samples.glob("*.mp4"))
        if not videos:
            raise RuntimeError(f"generate wrote no mp4 under {samples}")
        captions = cli("caption", "--ckpt", str(last), "--videos", str(videos[0]))
        lines = [line for line in captions.splitlines() if line.strip()]
        return {
            **result,
            "generated": videos[0].name,
            "caption": lines[-1].split("\t", 1)[-1][:120] if lines else "",
        }

    return [_attempt(row, run)]


# ---------------------------------------------------------------------------- run / report
CASE_LISTS = ("scaling", "fsdp", "memory")


def select(preset: dict, only: list[str] | None) -> dict:
    """The preset with its case lists (scaling, fsdp, memory) cut to the cases whose label holds
    one of ``only``; every case when ``only`` is empty."""
    if not only:
        return preset

    def keep(case) -> bool:
        label = (case[1] if isinstance(case, tuple) else case).label
        return any(part in label for part in only)

    return {k: [c for c in v if keep(c)] if k in CASE_LISTS else v for k, v in preset.items()}


def run(args) -> Path:
    preset = select(PRESETS[args.preset], args.only)
    work = Path(args.work)
    raw = {"preset": args.preset, "parts": {}}
    path = work / RAW_NAME
    for part in args.parts:  # written after every part: a run cut short keeps what it measured
        raw["parts"][part] = globals()[part](preset, work)
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(raw, indent=2) + "\n")
    return path


COLUMNS = {
    "ddp_curves": ["case", "batch", "steps", "max_rel_diff", "mean_rel_diff", "median_rel_diff"]
    + ["late_mean_rel_diff", "floor_max_rel_diff", "floor_mean_rel_diff", "floor_median_rel_diff"]
    + ["floor_late_mean_rel_diff"]
    + ["rank_overlap_per_epoch", "same_batches_as_1rank", "error"],
    "ddp_eval": ["metric", "weights", "1_rank", "2_ranks", "abs_diff", "ranks_agree", "error"],
    "ddp_scaling": ["case", "ranks", "batch_per_rank", "seconds", "steps_per_s"]
    + ["examples_per_s", "speedup", "peak_gib", "error"],
    "fsdp": ["case", "size", "strategy", "params_b", "seconds", "peak_gib", "resume_max_rel_diff"]
    + ["consolidated_equals_sharded", "consolidated_gib", "loads_for_sampling", "error"],
    "memory": ["case", "ranks", "strategy", "params_b", "seconds", "peak_gib", "error"],
    "fsdp_cli": ["case", "ranks", "overlay", "fit_s", "checkpoint", "consolidated_equals_sharded"]
    + ["generated", "caption", "error"],
}
NOTES = {
    "ddp_curves": "2 ranks at B/2 vs 1 rank at B, same seed; the ranks' batches together are "
    "the 1-rank run's (`same_batches_as_1rank`), the per-sample noise differs (seeded by rank). "
    "`late_mean_rel_diff`: mean loss over the second half of the steps. `floor_*`: the same "
    "differences between two 1-rank runs that differ only in their per-step randomness (seed "
    "0 vs 1): the noise that the 2-rank run is judged against. `rank_overlap_per_epoch`: clips "
    "both ranks read within one epoch (0: disjoint).",
    "ddp_eval": "`validate` with `callbacks.Evaluation` on the whole validation split, one "
    "process against two ranks that each hold part of it; every clip is sampled from its own "
    "seed and the numbers are gathered over ranks. `ranks_agree`: both ranks report the same "
    "value. The validation losses draw their noise per rank, so they agree within noise only.",
    "ddp_scaling": "Examples/s over all ranks; `speedup`: 2 ranks over 1 (target >= 1.8).",
    "fsdp": "Full sharding on 2 ranks, AdamW; `peak_gib`: the largest rank's peak allocated "
    "memory. Resume: a sharded checkpoint half-way, the next losses against the uninterrupted "
    "run's; consolidated with Lightning's consolidate_checkpoint, read with "
    "`lightning_vigu.export.read_checkpoint`. On CPU (toy) Lightning refuses FSDPStrategy "
    "('requires a GPU accelerator'): the toy runs the save/resume/read path with DDP, and "
    "sharding, the sharded checkpoint and its consolidation are not exercised. "
    "`loads_for_sampling`: the consolidated file read by `lightning_vigu.cli.load_module`, "
    "what `generate` and `caption` load.",
    "memory": "`wan1.3b` (3.05B parameters with the caption stream, random weights), batch 1, "
    "AdamW, bf16-mixed, gradient checkpointing; `peak_gib`: the largest rank's peak allocated "
    "memory; `seconds`: one step. refine_frozen trains the caption experts and embeddings only; "
    "LoRA: rank-64 adapters on the video path, the caption stream trained in full.",
    "fsdp_cli": "`python -m lightning_vigu fit -c conf/recall.yaml <overlay> --trainer.devices=2` "
    "(tiny model, synthetic world), the last checkpoint consolidated when sharded, then "
    "`generate --ckpt` and `caption --ckpt` on it through the command line.",
}


def report(raw: Path, out: Path) -> None:
    data = json.loads(Path(raw).read_text())
    for part, rows in data["parts"].items():
        table = markdown_table(rows, COLUMNS[part]) + f"\n\n{NOTES[part]}"
        name = f"distributed_{part}_{data['preset']}"
        write_results(name, {"preset": data["preset"], "rows": rows}, table, out)
        print(f"{table}\nwrote {out / name}.json", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("part", choices=["run", "report", "all"])
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="scaling/fsdp/memory: cases whose label holds one of these",
    )
    p.add_argument("--work", default="runs/bench_distributed", help="runs and raw results")
    p.add_argument("--raw", default=None, help="raw results for report (default <work>/...)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    run_then_report(p.parse_args(argv), run, report, RAW_NAME)


if __name__ == "__main__":
    main()
