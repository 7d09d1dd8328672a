"""The lean step: a teacher cast once to bf16 and compiled under inference mode that computes what the eager fp32
teacher computes and keeps its identity; student forward + losses and the teacher traced whole, without graph
breaks or recompiles; the fused optimizer's key; EMA on multi-tensor kernels."""

from __future__ import annotations

import pytest
import torch

from dali_kd.config import LossConfig, ModelConfig, OptimizerConfig
from dali_kd.errors import UserError
from dali_kd.identity import weights_hash
from dali_kd.models import FrozenTeacher, Student, build_distill_models, create_model
from dali_kd.models.inputs import InputSpec
from dali_kd.pipelines.params import IMAGENET_MEAN, IMAGENET_STD
from dali_kd.training.ema import StudentEma
from dali_kd.training.optim import build_optimizer, use_fused
from dali_kd.training.task import DistillTask

CPU = torch.device("cpu")
VIEWS = InputSpec(32, IMAGENET_MEAN, IMAGENET_STD)  # the views a data stream would hand out
CUDA = torch.device("cuda")


def model_config(teacher: str, student: str, compile: bool | str = "auto") -> ModelConfig:
    return ModelConfig(
        teacher={"name": teacher, "num_classes": 4, "compile": compile}, student={"name": student}
    )


def build(cfg: ModelConfig, amp_dtype: torch.dtype | None, patch_weight: float = 0.0):
    torch.manual_seed(0)
    return build_distill_models(cfg, 32, patch_weight, False, CPU, amp_dtype, pipeline=VIEWS)


@pytest.mark.slow
def test_cast_and_compiled_teacher_matches_the_eager_fp32_teacher_and_keeps_its_identity():
    eager = build(model_config("test_vit", "test_resnet", compile=False), None)
    lean = build(model_config("test_vit", "test_resnet", compile=True), torch.bfloat16)
    assert lean.teacher.compiled and not eager.teacher.compiled
    # Cast once: the linear layers hold bf16 weights, the norms keep fp32 (as bf16 autocast computes them).
    assert lean.teacher.model.head.weight.dtype == torch.bfloat16
    assert lean.teacher.model.norm.weight.dtype == torch.float32
    # The identity a checkpoint and the teacher cache are tied to: the fp32 weights, whatever the teacher runs in.
    assert lean.teacher_id == eager.teacher_id
    torch.manual_seed(0)
    fresh = create_model("test_vit", 32, 4)
    assert lean.teacher_id["weights_hash"] == weights_hash(fresh)
    images = torch.randn(8, 3, 32, 32)
    want = eager.teacher(images, with_patches=True)
    for _ in range(2):  # the second call runs the compiled graph again
        got = lean.teacher(images, with_patches=True)
        for name in ("pooled", "logits", "patch_tokens"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == torch.float32 and not a.is_inference() and not a.requires_grad
            # bf16 keeps 8 bits of mantissa: within a few percent of the output's scale.
            assert (a - b).abs().max() <= 0.05 * b.abs().max(), name
    # The evaluation's call (no patch tokens, under no_grad) works on the compiled teacher too.
    with torch.no_grad():
        assert lean.teacher(images).patch_tokens is None


class GraphCounter:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


PAIRS = {
    "vit": ("test_vit", "test_vit", 1.0, False),  # same token grid: the patch-token loss is on
    "resnet": ("test_resnet", "test_resnet", 0.0, False),
    "vit-multi-crop": ("test_vit", "test_vit", 0.0, True),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_teacher_and_student_forward_with_loss_compile_whole_and_once(pair):
    """fullgraph=True refuses any graph break; three steps with the same shapes make one graph each."""
    teacher_name, student_name, patch_weight, multi_crop = PAIRS[pair]
    torch.manual_seed(0)
    # bf16 as on CUDA: the autocast regions are part of both graphs.
    teacher = FrozenTeacher(create_model(teacher_name, 32, 4), torch.bfloat16)
    backbone = create_model(student_name, 32, 4, any_size=multi_crop)
    with_patches = patch_weight > 0
    student = Student(backbone, teacher.model.num_features, 0, with_patches)
    loss = LossConfig(patch_weight=patch_weight, label_weight=0.5)
    task = DistillTask(student, loss, CPU, torch.bfloat16)
    teacher_graphs, student_graphs = GraphCounter(), GraphCounter()
    teacher_step = torch.compile(teacher._eager_outputs, backend=teacher_graphs, fullgraph=True)
    student_step = torch.compile(task.forward_with_loss, backend=student_graphs, fullgraph=True)
    optimizer = torch.optim.AdamW(student.parameters())
    for _ in range(3):
        if multi_crop:
            images, local = torch.randn(4, 2, 3, 32, 32), torch.randn(4, 3, 3, 16, 16)
            globals_ = images.transpose(0, 1).flatten(0, 1)
        else:
            images, local = torch.randn(4, 3, 32, 32), None
            globals_ = images
        with torch.inference_mode():
            targets = teacher_step(globals_, with_patches)
        targets = [
            None if t is None else t.clone() for t in (targets.pooled, targets.logits, targets.patch_tokens)
        ]
        losses = student_step(images, local, *targets, torch.tensor([0, 1, 2, 3]))
        names = " ".join(losses)
        assert ("loss_patch" in names) == with_patches and "loss_label" in names
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert (teacher_graphs.graphs, student_graphs.graphs) == (1, 1)


def test_fused_optimizer_key():
    assert use_fused(OptimizerConfig(), CUDA) and not use_fused(OptimizerConfig(), CPU)
    assert use_fused(OptimizerConfig(name="lookahead_adam"), CUDA)
    assert not use_fused(OptimizerConfig(name="lamb"), CUDA)  # auto: no fused kernel, no error
    assert not use_fused(OptimizerConfig(fused=False), CUDA)
    student = Student(create_model("test_resnet", 32, 4), 8, 0, False)
    fused = build_optimizer(student, OptimizerConfig(fused=True), 0.1, CPU)
    assert all(group["fused"] for group in fused.param_groups)
    with pytest.raises(UserError, match=r"^train\.optimizer\.fused=true: the optimizer 'lamb' has no fused"):
        build_optimizer(student, OptimizerConfig(name="lamb", fused=True), 0.1, CPU)


def test_a_resumed_optimizer_runs_as_this_run_configures_it():
    """An unfused checkpoint loaded into a fused optimizer (a run moved to a GPU, or saved before the key existed)
    becomes fused, with its step counts where the fused kernel keeps them; and back."""
    student = Student(create_model("test_resnet", 32, 4), 8, 0, False)
    plain = build_optimizer(student, OptimizerConfig(fused=False), 0.1, CPU)
    student(torch.randn(2, 3, 32, 32))[0].projected.sum().backward()
    plain.step()
    fused = build_optimizer(student, OptimizerConfig(fused=True), 0.1, CPU)
    fused.load_state_dict(plain.state_dict())
    assert all(group["fused"] for group in fused.param_groups)
    assert all(s["step"].dtype == torch.float32 and s["step"].item() == 1 for s in fused.state.values())
    fused.step()
    back = build_optimizer(student, OptimizerConfig(fused=False), 0.1, CPU)
    back.load_state_dict(fused.state_dict())
    assert not any(group["fused"] for group in back.param_groups)
    back.step()
    assert all(s["step"].item() == 3 for s in back.state.values())


def test_ema_updates_with_one_multi_tensor_lerp(monkeypatch):
    student = Student(create_model("test_vit", 32, 4), 64, 0, False)
    ema = StudentEma(student, 0.9, warmup=True)
    calls = []
    lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: calls.append(len(a[0])) or lerp(*a, **k))
    with torch.no_grad():
        for p in student.backbone.parameters():
            p.add_(1.0)
    ema.update(student, step=5)
    assert calls == [len([t for t in student.backbone.state_dict().values() if t.is_floating_point()])]
    first = next(iter(ema.backbone.parameters()))
    assert not torch.equal(first, next(iter(student.backbone.parameters())))
