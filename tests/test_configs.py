"""The YAML configs: every file parses through its CLI, overlays merge, and the recipes say what
their names promise. A last test trains the Wan recipe end to end on a tiny Wan folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy
from tiny_wan import TRANSFORMER, tiny_wan_folder

from lightning_vigu.cli import ViGUCLI
from lightning_vigu.model import UnifiedBlock, parameter_group
from lightning_vigu.phases import get_phase

CONF = Path(__file__).resolve().parents[1] / "conf"
OVERLAYS = ("ddp.yaml", "fsdp.yaml", "gpu.yaml", "lora.yaml", "wandb.yaml")
RUNS = sorted(p.name for p in CONF.glob("*.yaml") if p.name not in OVERLAYS)
WAN = ("wan1.3b_recall.yaml", "wan1.3b_refine.yaml")


@pytest.fixture(autouse=True)
def _cli_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv holds other arguments (pytest's)."""
    monkeypatch.setattr("sys.argv", ["lightning_vigu"])


def print_config(capsys, *files: str, extra: tuple[str, ...] = ()) -> dict:
    """The config ``fit -c F1 -c F2 ... --print_config`` prints (parsed, never instantiated)."""
    args = ["fit", *(a for f in files for a in ("-c", str(CONF / f))), *extra, "--print_config"]
    if files[0] == "arcap.yaml":  # the autoregressive baseline has its own LightningCLI
        from benchmarks.baselines import main as run_cli
    else:
        run_cli = ViGUCLI
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(args=args)
    out = capsys.readouterr()
    assert stop.value.code in (0, None), out.err[-2000:]
    return yaml.safe_load(out.out)


@pytest.mark.parametrize("name", RUNS)
def test_every_run_config_parses(capsys, name):
    config = print_config(capsys, name)
    assert config["trainer"]["max_steps"] > 0 and config["data"]["class_path"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_merge_into_a_run_config(capsys, overlay):
    base = print_config(capsys, "recall.yaml")
    merged = print_config(capsys, "recall.yaml", overlay)
    # dotted keys in a second file change their own keys and keep the rest of each group
    own = yaml.safe_load((CONF / overlay).read_text()) or {}
    prefix = "model.objective."
    set_here = {k.removeprefix(prefix): v for k, v in own.items() if k.startswith(prefix)}
    assert merged["model"]["tokenizer"] == base["model"]["tokenizer"]
    assert merged["model"]["objective"] == base["model"]["objective"] | set_here
    assert merged["trainer"]["callbacks"] == base["trainer"]["callbacks"]
    assert merged["seed_everything"] == base["seed_everything"]


def test_wan_configs_parse_without_instantiating(capsys):
    # the Wan folders and caches are placeholders that do not exist here: parsing never reads them
    assert not Path("/models/Wan2.1-T2V-1.3B-Diffusers").exists()
    for name in WAN:
        config = print_config(capsys, name)
        model, trainer = config["model"], config["trainer"]
        assert model["size"] == "wan1.3b" and trainer["precision"] == "bf16-mixed"
        assert model["codec"]["class_path"] == "lightning_vigu.codecs.WanVAECodec"
        assert model["tokenizer"]["class_path"] == "lightning_vigu.text.HFTokenizer"
        assert (
            model["prompt_encoder"]["class_path"] == "lightning_vigu.text.PrecomputedPromptEncoder"
        )
        assert model["lr"] == pytest.approx(5e-5) and model["caption_length"] == 256
        assert model["gradient_checkpointing"] is True and model["compile"] == "blocks"
        assert config["data"]["init_args"]["latents"] is True
        ema = [c for c in trainer["callbacks"] if c["class_path"] == "callbacks.EMA"]
        assert ema and ema[0]["init_args"]["decay"] == 0.9999
        assert ema[0]["init_args"]["device"] == "cuda"


def test_refine_configs_train_the_video_path_and_keep_generating(capsys):
    """Both refine configs train attention with text->video in the mix; the pretrained Wan's
    moves gently (a lower video lr), the synthetic world's still-learning generator does not."""
    for name, recall, gentle in (
        ("refine.yaml", "recall.yaml", False),
        ("wan1.3b_refine.yaml", WAN[0], True),
    ):
        config = print_config(capsys, name)
        phase = get_phase(config["phase"])
        assert {"video", "text_experts", "text_embed"} <= set(phase.trainable)
        assert (phase.group_lr("video") < phase.group_lr("text_experts")) is gentle
        assert phase.caption_target == "caption" and phase.task_mix["t2v"] > 0
        assert config["init_from"].startswith(
            print_config(capsys, recall)["trainer"]["default_root_dir"]
        )


# ---------------------------------------------------------------------------- run folders
PHASES = [name for name in RUNS if name != "arcap.yaml"]  # arcap: the baseline's own trainer


def _run_paths(trainer: dict) -> tuple[list[str], set[str]]:
    """The loggers' save_dirs and the checkpoint callbacks' dirpaths of a printed config."""
    logs = [logger["init_args"]["save_dir"] for logger in trainer["logger"]]
    checkpoints = {
        cb["init_args"]["dirpath"] for cb in trainer["callbacks"] if "dirpath" in cb["init_args"]
    }
    return logs, checkpoints


@pytest.mark.parametrize("name", PHASES)
def test_the_run_folder_is_named_once_and_every_path_follows_it(capsys, tmp_path, name):
    folder = f"runs/{Path(name).stem}"
    settings = [ln for ln in (CONF / name).read_text().splitlines() if not ln.startswith("#")]
    assert sum(folder in ln for ln in settings) == 1, f"{name} names {folder} more than once"
    moved = str(tmp_path / "run")  # one option moves every folder of the run
    for root, extra in ((folder, ()), (moved, (f"--trainer.default_root_dir={moved}",))):
        trainer = print_config(capsys, name, extra=extra)["trainer"]
        assert trainer["default_root_dir"] == root
        assert _run_paths(trainer) == ([root, root], {f"{root}/checkpoints"})
        kinds = [cb["class_path"].rsplit(".", 1)[1] for cb in trainer["callbacks"]]
        assert {"ModelCheckpoint", "OnExceptionCheckpoint", "EMA"} <= set(kinds)
        (every,) = [
            cb["init_args"]["every_n_train_steps"]
            for cb in trainer["callbacks"]
            if cb["class_path"].endswith("ModelCheckpoint")
        ]
        assert every == trainer["val_check_interval"] > 0  # a checkpoint at every validation


def test_the_run_folder_override_moves_the_built_trainer_and_the_wandb_overlay(capsys, tmp_path):
    from lightning_vigu import runs

    root = tmp_path / "elsewhere"
    cli = ViGUCLI(
        args=["-c", str(CONF / "recall.yaml"), f"--trainer.default_root_dir={root}"], run=False
    )
    folders = runs.run_folders(cli.trainer)
    assert set(folders) == {root, root / "checkpoints"}
    assert cli.trainer.checkpoint_callback.dirpath == str(root / "checkpoints")
    assert [Path(logger.save_dir) for logger in cli.trainer.loggers] == [root, root]
    wandb = print_config(
        capsys, "recall.yaml", "wandb.yaml", extra=(f"--trainer.default_root_dir={root}",)
    )
    assert wandb["trainer"]["logger"]["init_args"]["save_dir"] == str(root)


def test_injected_parts_are_hyperparameters_when_a_config_made_them():
    """save_config_hyperparameters: the CLI's module keeps the tokenizer's config (so
    load_from_checkpoint rebuilds it); a module built in Python leaves the instance out."""
    from datamodules.synthetic import WorldTokenizer
    from lightning_vigu.module import UniViGU

    cli = ViGUCLI(args=["-c", str(CONF / "recall.yaml")], run=False)
    assert cli.model.hparams["tokenizer"]["class_path"] == "datamodules.synthetic.WorldTokenizer"
    module = UniViGU(size="tiny", tokenizer=WorldTokenizer(), video_shape=(2, 8, 8))
    assert "tokenizer" not in module.hparams and module.hparams["size"] == "tiny"


def test_a_config_on_a_trainer_preset_must_name_its_run_folder(tmp_path):
    from omegaconf.errors import InterpolationToMissingValueError

    config = tmp_path / "unnamed.yaml"
    config.write_text(f"config: {CONF / 'trainer/synthetic.yaml'}\ntrainer.max_steps: 10\n")
    with pytest.raises(InterpolationToMissingValueError, match="trainer.default_root_dir"):
        ViGUCLI(args=["fit", "-c", str(config), "--print_config"])


def _header_commands() -> list[tuple[str, list[str]]]:
    """Every one-line ``python -m lightning_vigu fit ...`` a config's header tells users to run,
    as (file, arguments after ``fit``); a trailing ``(note)`` is dropped."""
    commands = []
    for path in sorted(CONF.glob("*.yaml")):
        for line in path.read_text().splitlines():
            if not line.startswith("#") or "python -m lightning_vigu fit" not in line:
                continue
            command = line.split("python -m lightning_vigu fit", 1)[1].split("  (")[0].strip()
            if not command.endswith("\\"):
                commands.append((path.name, command.split()))
    return commands


@pytest.mark.parametrize(("name", "args"), _header_commands())
def test_every_command_a_config_header_hints_parses(capsys, name, args):
    files = [a.removeprefix("conf/") for a in args if a.startswith("conf/")]
    assert args[::2][: len(files)] == ["-c"] * len(files), f"{name}: {args}"
    config = print_config(capsys, *files, extra=tuple(args[2 * len(files) :]))
    if any(a.startswith("--init_from=runs/") for a in args):  # the generator -> recall hand-over
        assert config["init_from"] == "runs/generator/checkpoints/last.ckpt"


def test_lora_overlay_adds_adapters_to_the_wan_recipe(capsys):
    base = print_config(capsys, WAN[0])
    lora = print_config(capsys, WAN[0], "lora.yaml")
    assert lora["model"]["lora"] == {"rank": 64, "alpha": 64}
    assert {k: v for k, v in lora["model"].items() if k != "lora"} == {
        k: v for k, v in base["model"].items() if k != "lora"
    }


def test_ddp_overlay(capsys):
    config = print_config(capsys, WAN[0], "ddp.yaml", extra=("--trainer.devices=8",))
    assert config["trainer"]["strategy"] == "ddp" and str(config["trainer"]["devices"]) == "8"
    assert config["trainer"]["precision"] == "bf16-mixed"


def test_fsdp_overlay_builds_the_strategy_it_describes(capsys):
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    config = print_config(capsys, WAN[0], "fsdp.yaml")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=str | Strategy)
    strategy = parser.instantiate(
        parser.parse_args(["--strategy", yaml.safe_dump(config["trainer"]["strategy"])])
    ).strategy
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {UnifiedBlock}
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "sharded"
    mp = strategy.mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (
        torch.bfloat16,
        torch.float32,
        None,
    )
    assert strategy._activation_checkpointing_kwargs == {}  # the model checkpoints its blocks


# ---------------------------------------------------------------------------- the Wan recipe
@pytest.fixture(scope="module")
def wan_recipe(tmp_path_factory, data_synthetic_shards):
    """A tiny Wan folder, its latent cache over the synthetic shards and its generator as an
    init_from checkpoint: what conf/wan1.3b_recall.yaml's header tells users to make."""
    from datamodules.latent_cache import cache_latents
    from lightning_vigu.codecs import WanVAECodec
    from lightning_vigu.pretrained import load_wan_transformer
    from lightning_vigu.text import UMT5PromptEncoder
    from lightning_vigu.video_io import ClipSpec

    wan = tiny_wan_folder(tmp_path_factory)
    root = tmp_path_factory.mktemp("wan_recipe")
    codec, encoder = WanVAECodec(wan), UMT5PromptEncoder(str(wan), max_length=16)
    for split in ("train", "val"):
        cache_latents(
            str(data_synthetic_shards / f"{split}-*.tar"),
            root / "latents" / split,
            codec,
            encoder,
            ClipSpec(num_frames=9),
            samples_per_shard=4,
            progress=False,
        )
    state = load_wan_transformer(wan).state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, root / "wan.ckpt")
    return wan, root


def _wan_args(wan: Path, root: Path, run: str, init_from: Path) -> list[str]:
    sizes = {k: v for k, v in TRANSFORMER.items() if k not in ("in_channels", "out_channels")}
    sizes["patch_size"] = list(sizes["patch_size"])
    sizes["text_ffn_dim"] = sizes["ffn_dim"]
    callbacks = [
        {"class_path": "callbacks.EMA", "init_args": {"decay": 0.9, "device": "cpu"}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / run), "save_last": True}},
    ]  # fmt: skip
    return [
        f"--init_from={init_from}",
        f"--model.codec.init_args.path={wan}",
        f"--model.tokenizer.init_args.path={wan / 'tokenizer'}",
        f"--model.prompt_encoder.init_args.empty_embedding={root / 'latents/train/empty_prompt_emb.pt'}",
        f"--model.model_overrides={yaml.safe_dump(sizes, default_flow_style=True)}",
        "--model.video_shape=[9, 32, 32]", "--model.caption_length=16",
        "--model.compile=none", "--model.warmup_steps=1",
        f"--data.init_args.train_shards={root / 'latents/train'}",
        f"--data.init_args.val_shards={root / 'latents/val'}",
        "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root / run}",
        f"--trainer.callbacks={yaml.safe_dump(callbacks, default_flow_style=True)}",
    ]  # fmt: skip


def test_wan_recipe_trains_recall_then_refine_on_a_tiny_wan_folder(wan_recipe):
    wan, root = wan_recipe
    recall = ViGUCLI(
        args=["fit", "-c", str(CONF / WAN[0]), *_wan_args(wan, root, "recall", root / "wan.ckpt")]
    )
    module = recall.model
    assert module.model.config.in_channels == 4  # from the Wan VAE, not the named size's 16
    assert recall.trainer.global_step == 2
    assert torch.isfinite(recall.trainer.callback_metrics["train/loss"])
    assert torch.isfinite(recall.trainer.callback_metrics["val/loss_text"])
    recall_ckpt = root / "recall" / "last.ckpt"
    saved = torch.load(recall_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith(("codec.", "prompt_encoder.")) for k in saved)  # re-read from paths

    refine = ViGUCLI(
        args=["fit", "-c", str(CONF / WAN[1]), *_wan_args(wan, root, "refine", recall_ckpt)]
    )
    assert refine.trainer.global_step == 2
    assert refine.model.phase.name == "refine_caption_heavy"  # the Wan recipe's refine
    assert refine.model.phase.caption_target == "caption"
    after = torch.load(root / "refine" / "last.ckpt", map_location="cpu", weights_only=False)
    video = [k for k in saved if k.startswith("model.") and parameter_group(k[6:]) == "video"]
    text = [k for k in saved if k.startswith("model.") and parameter_group(k[6:]) == "text_experts"]
    assert video and text
    moved = {k: (after["state_dict"][k] - saved[k]).abs().max().item() for k in video + text}
    assert max(moved[k] for k in video) > 0  # refine moves the generator too (at a lower lr)
    assert max(moved[k] for k in text) > 1e-5  # trained
