"""Teachers and students by pretrained timm name, from a Hugging Face hub cache built here (no network):
the cached weights are the ones loaded, hf-hub: names too, a checkpoint wins, an uncached name is one clear error."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from dali_kd.commands import fetch, train
from dali_kd.config import ModelConfig, ModelSpec, TeacherSpec
from dali_kd.errors import UserError
from dali_kd.identity import weights_hash
from dali_kd.models import build_distill_models, build_model, check_model_name, head_sizes, pretrained_weights
from dali_kd.models.inputs import InputSpec
from dali_kd.pipelines.params import IMAGENET_MEAN, IMAGENET_STD

CPU = torch.device("cpu")
VIEWS = InputSpec(32, IMAGENET_MEAN, IMAGENET_STD)  # the views a data stream would hand out
TAGGED = (
    "test_vit.r160_in1k"  # a real timm name whose weights timm takes from the hub (timm/test_vit.r160_in1k)
)
UNCACHED = "test_resnet.r160_in1k"  # the same, never put into the test cache


def put_in_hub_cache(hub: Path, repo_id: str, model: torch.nn.Module, with_config: bool) -> Path:
    """model's weights where huggingface_hub keeps repo_id's files: models--OWNER--NAME/snapshots/<commit>/,
    with refs/main naming the commit (and config.json, which an hf-hub: name needs)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    if with_config:
        save_config_for_hf(model, str(snapshot / "config.json"))
    return snapshot


def offline_machine(monkeypatch, hf_home: Path) -> None:
    """A machine without network whose job script set HF_HOME=hf_home and HF_HUB_OFFLINE=1: huggingface_hub reads
    them when it is imported, as a run's process does, so its constants are set along with the environment."""
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline machine whose HF_HOME holds test_vit.r160_in1k (the weights of a seeded random model, so that
    they differ from any fresh init); returns those weights."""
    offline_machine(monkeypatch, tmp_path / "hf")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(123)
    model = timm.create_model("test_vit", num_classes=1000)
    put_in_hub_cache(tmp_path / "hf" / "hub", f"timm/{TAGGED}", model, with_config=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(
    model: torch.nn.Module, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()
) -> bool:
    state = model.state_dict()
    assert set(state) == set(expected)
    return all(torch.equal(state[k], v) for k, v in expected.items() if k not in skip)


@pytest.mark.parametrize("name", [TAGGED, f"hf-hub:timm/{TAGGED}"])
def test_a_pretrained_model_by_name_has_exactly_the_cached_weights(hub_cache, name):
    model = build_model(ModelSpec(name=name, pretrained=True), "teacher", 160, 1000)
    assert same_weights(model, hub_cache)
    random_init = build_model(ModelSpec(name=name.removeprefix("hf-hub:timm/")), "teacher", 160, 1000)
    assert not same_weights(random_init, hub_cache), "pretrained: false stays a random init"


def test_another_image_size_resamples_the_position_embedding_and_keeps_the_rest(hub_cache):
    spec = ModelSpec(name=TAGGED, pretrained=True)
    model = build_model(spec, "teacher", 32, 1000)  # the weights are for 160 px: 10x10 patches, here 2x2
    assert model.pos_embed.shape == (1, 1 + 4, 64) and hub_cache["pos_embed"].shape == (1, 1 + 100, 64)
    assert same_weights(model, hub_cache, skip=("pos_embed",))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)
    any_size = build_model(spec, "student", 32, 1000, any_size=True)  # multi-crop's local crops
    assert same_weights(any_size, hub_cache, skip=("pos_embed",))
    assert any_size(torch.zeros(1, 3, 16, 16)).shape == (1, 1000)


def test_a_checkpoint_file_wins_over_pretrained(hub_cache, tmp_path):
    other = timm.create_model("test_vit", num_classes=1000)
    path = tmp_path / "mine.safetensors"
    save_file(other.state_dict(), str(path))
    model = build_model(ModelSpec(name=TAGGED, pretrained=True, checkpoint=str(path)), "teacher", 160, 1000)
    assert same_weights(model, other.state_dict()) and not same_weights(model, hub_cache)
    # Nothing is looked up in the cache for it: an uncached name with a checkpoint builds offline.
    resnet = timm.create_model("test_resnet", num_classes=1000)
    save_file(resnet.state_dict(), str(path))
    teacher = TeacherSpec(name=UNCACHED, pretrained=True, checkpoint=str(path))
    models = build_distill_models(
        ModelConfig(teacher=teacher, student={"name": "test_vit"}), 32, 0.0, False, CPU, None, pipeline=VIEWS
    )
    assert same_weights(models.teacher.model, resnet.state_dict())


def test_an_uncached_name_offline_is_one_line_naming_model_cache_and_fetch_command(hub_cache, tmp_path):
    with pytest.raises(UserError) as raised:
        build_model(ModelSpec(name=UNCACHED, pretrained=True), "teacher", 32, 1000)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("model.teacher.pretrained: ")
    assert f"'{UNCACHED}'" in message
    assert str(tmp_path / "hf" / "hub" / f"models--timm--{UNCACHED}") in message
    assert message.endswith(f"HF_HOME={tmp_path / 'hf'} python -m dali_kd.fetch {UNCACHED}")


def test_offline_nothing_is_downloaded_and_the_message_names_the_setting(hub_cache, monkeypatch):
    import torch.hub

    from dali_kd.models.hub import find_pretrained

    tried = []

    def no_network(*args, **kwargs):
        tried.append(args)
        raise AssertionError("a download was attempted with HF_HUB_OFFLINE=1")

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(timm.models._hub, "download_url_to_file", no_network)  # timm's URL downloads
    with pytest.raises(UserError) as raised:
        find_pretrained(UNCACHED, "model.teacher.pretrained")
    assert tried == [], "a download was attempted on an offline machine"
    assert "HF_HUB_OFFLINE is set" in str(raised.value)


def test_train_exits_2_before_any_run_directory_for_an_uncached_teacher(
    hub_cache, image_tree, tmp_path, capsys
):
    code = train.main(
        cli_args(image_tree, tmp_path, f"model.teacher.name={UNCACHED}", "model.teacher.pretrained=true")
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.teacher.pretrained: ")
    assert f"python -m dali_kd.fetch {UNCACHED}" in err[0]
    assert not (tmp_path / "runs").exists()


def cli_args(image_tree: Path, tmp_path: Path, *overrides: str) -> list[str]:
    return [
        "--device", "cpu", "--no-progress", f"data.root={image_tree / 'train'}",
        f"data.val_root={image_tree / 'val'}", "data.image_size=32", "data.eval_resize=36", "data.dali_threads=1",
        "model.teacher.checkpoint=null", "model.teacher.num_classes=null", "model.student.name=test_vit",
        "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=2", "train.compile_student=false",
        f"train.output_dir={tmp_path / 'runs'}", "train.run_name=pretrained", *overrides,
    ]  # fmt: skip


def test_a_short_distillation_from_a_cached_pretrained_teacher(hub_cache, image_tree, tmp_path, capsys):
    args = cli_args(image_tree, tmp_path, f"model.teacher.name={TAGGED}", "model.teacher.pretrained=true")
    assert train.main(args) == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "pretrained"
    checkpoint = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1], weights_only=True)
    assert checkpoint["step"] == 2
    # The run's teacher is the cached one, at the run's 32 px (its position embedding resampled).
    teacher = build_model(ModelSpec(name=TAGGED, pretrained=True), "teacher", 32, 1000)
    assert same_weights(teacher, hub_cache, skip=("pos_embed",))
    assert checkpoint["teacher"] == {"name": TAGGED, "weights_hash": weights_hash(teacher)}


def test_head_sizes_follow_the_pretrained_head(hub_cache, tmp_path):
    # A backbone without a classifier (as DINOv2's weights are): null gives the teacher no head, and the
    # student the teacher's count, none: distillation is then on features only.
    torch.manual_seed(0)
    headless = timm.create_model("test_vit", num_classes=0)
    put_in_hub_cache(tmp_path / "hf" / "hub", "me/test_vit_features", headless, with_config=True)
    cfg = ModelConfig(
        teacher=TeacherSpec(name="hf-hub:me/test_vit_features", pretrained=True),
        student={"name": "test_resnet"},
    )
    assert head_sizes(cfg, pretrained_weights(cfg.teacher, "teacher")) == (0, 0)
    models = build_distill_models(cfg, 32, 0.0, False, CPU, None, pipeline=VIEWS)
    assert models.teacher.model.num_classes == 0 and models.student.backbone.num_classes == 0
    assert same_weights(models.teacher.model, headless.state_dict(), skip=("pos_embed",))
    out = models.teacher(torch.zeros(2, 3, 32, 32))
    assert out.logits is None and out.pooled.shape == (2, 64)

    with_head = ModelConfig(
        teacher=TeacherSpec(name=TAGGED, pretrained=True), student={"name": "test_resnet"}
    )
    assert head_sizes(with_head, pretrained_weights(with_head.teacher, "teacher")) == (1000, 1000)
    # A pretrained teacher with another class count would get a fresh random head: its logits teach noise.
    four = with_head.model_copy(update={"teacher": TeacherSpec(name=TAGGED, pretrained=True, num_classes=4)})
    with pytest.raises(
        UserError, match=r"model.teacher.num_classes=4, but the pretrained .* has 1000 .*random"
    ):
        head_sizes(four, pretrained_weights(four.teacher, "teacher"))
    no_head = with_head.model_copy(update={"teacher": ModelSpec(name=TAGGED, pretrained=True, num_classes=0)})
    assert head_sizes(no_head, pretrained_weights(no_head.teacher, "teacher")) == (0, 0)


def test_model_names_with_tags_and_hub_names_are_checked():
    check_model_name("vit_base_patch16_224.augreg2_in21k_ft_in1k", "teacher")
    check_model_name("hf-hub:timm/vit_small_patch14_dinov2.lvd142m", "teacher")  # known only from its config
    with pytest.raises(UserError, match=r"model.teacher.name: timm has no pretrained tag 'augreg2_in21k' .*"
                       r"did you mean 'vit_base_patch16_224.augreg_in21k'"):  # fmt: skip
        check_model_name("vit_base_patch16_224.augreg2_in21k", "teacher")
    with pytest.raises(UserError, match=r"model.student.name: unknown timm model 'vit_bse_patch16_224.dino'"):
        check_model_name("vit_bse_patch16_224.dino", "student")
    with pytest.raises(UserError, match="expected hf-hub:OWNER/REPO"):
        check_model_name("hf-hub:vit_base_patch16_224", "teacher")


def test_a_hub_name_is_only_built_from_the_cache_with_its_weights(hub_cache, tmp_path):
    # Without pretrained: true, timm would read the model's config.json from the hub: refused, not a download.
    for spec in (
        ModelSpec(name=f"hf-hub:timm/{TAGGED}"),
        ModelSpec(name=f"hf-hub:timm/{TAGGED}", pretrained=True, checkpoint=str(tmp_path / "x.safetensors")),
    ):
        with pytest.raises(
            UserError, match=r"model.student.name: hf-hub:timm/test_vit.r160_in1k is built from"
        ):
            build_model(spec, "student", 32, 1000)


def test_fetch_says_where_a_cached_model_is_and_names_what_is_missing(hub_cache, tmp_path, capsys):
    assert fetch.main([TAGGED]) == 0
    out = capsys.readouterr().out
    snapshot = next((tmp_path / "hf" / "hub" / f"models--timm--{TAGGED}" / "snapshots").iterdir())
    assert f"{TAGGED}: already cached in {snapshot / 'model.safetensors'}" in out

    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(
        f"teacher: {{name: {UNCACHED}, pretrained: true}}\nstudent: {{name: test_vit, pretrained: false}}\n"
    )
    assert fetch.main(["--model_config", str(model_yaml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {model_yaml}: model.teacher.pretrained: ")
    assert err[0].endswith(f"python -m dali_kd.fetch {UNCACHED}")


def test_distilling_a_pretrained_teacher_by_name_with_its_own_normalisation(
    tiny_config, tmp_path, monkeypatch
):
    """The issue's whole path: a teacher by hub name from the local cache, fed with its own mean/std (CLIP's,
    not the pipeline's ImageNet statistics), distilled into a student with an EMA; head top-1, k-NN and the EMA's
    results are reported for a teacher whose head has the data's classes."""
    from dali_kd.data.dataset import ImageIndex
    from dali_kd.data.loaders import make_eval_batches
    from dali_kd.pipelines.params import IMAGENET_MEAN, IMAGENET_STD
    from dali_kd.training.trainer import Trainer

    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    offline_machine(monkeypatch, tmp_path / "hf")
    torch.manual_seed(7)
    teacher = timm.create_model("test_vit", num_classes=4, img_size=32)
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "mean": clip_mean, "std": clip_std}
    put_in_hub_cache(tmp_path / "hf" / "hub", "timm/kd_test_teacher", teacher, with_config=True)
    cfg = tiny_config(
        "model.teacher.name=hf-hub:timm/kd_test_teacher", "model.teacher.pretrained=true",
        "model.teacher.num_classes=null", "data.backend=torchvision", "train.ema_decay=0.9",
        "train.epochs=2", "train.max_steps_per_epoch=3",
    )  # fmt: skip
    trainer = Trainer(cfg, CPU, show_progress=False)
    assert same_weights(trainer.parts.teacher.model, teacher.state_dict())
    summary = trainer.fit(tmp_path / "run")
    assert summary["inputs"]["teacher"]["mean"] == pytest.approx(list(clip_mean))
    assert summary["inputs"]["student"]["mean"] == pytest.approx(list(IMAGENET_MEAN))
    for key in ("teacher_knn_top1", "teacher_head_top1", "student_knn_top1", "student_head_top1",
                "student_ema_knn_top1", "student_ema_head_top1"):  # fmt: skip
        assert 0 <= summary[key] <= 100, key
    # The teacher's head top-1 is what its weights score on the val images normalised its own way.
    val = ImageIndex.from_folder(cfg.data.val_root)
    correct = total = 0
    for batch in make_eval_batches(replace(cfg.stream_settings(), batch_size=8), val, CPU):
        pixels = batch.images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(
            IMAGENET_MEAN
        ).view(1, 3, 1, 1)
        own = (pixels - torch.tensor(clip_mean).view(1, 3, 1, 1)) / torch.tensor(clip_std).view(1, 3, 1, 1)
        with torch.no_grad():
            correct += int((teacher.eval()(own).argmax(-1) == batch.labels).sum())
        total += len(batch)
    assert summary["teacher_head_top1"] == pytest.approx(100.0 * correct / total)
