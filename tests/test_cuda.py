"""merge on a GPU: statistics on the device, the merged model back on the caller's device and dtype,
the same assignments as on the CPU. Skipped where no CUDA device is present (benchmarks/gpu_check.sh
runs these on a GPU machine)."""
import pytest
import torch

from mergekit_vision import merge, permute, random_perms, trace_permutation_spec
from mergekit_vision.calibration import collect_statistics, plan_calibration
from mergekit_vision.testing import randomize_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _pair(seed=0):
    timm = pytest.importorskip("timm")
    a = randomize_model(timm.create_model("resnet18", pretrained=False, num_classes=10).eval(), seed=seed)
    b = randomize_model(timm.create_model("resnet18", pretrained=False, num_classes=10).eval(), seed=seed + 1)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(64, 3, 32, 32, generator=g) for _ in range(4)]
    return a, b, calib


def _rel(x, y):
    return float((x - y).norm() / y.norm())


def test_statistics_stay_on_the_device():
    a, b, calib = _pair()
    a, b = a.cuda(), b.cuda()
    plan = plan_calibration(a, calib[0][:1].cuda())
    st = collect_statistics([a, b], calib, plan, pairs=[(0, 1)], sites=True)
    assert st.cross and st.channels
    assert all(m.mab.device.type == "cuda" and m.mab.dtype == torch.float64 for m in st.cross.values())
    assert all(m.mean.device.type == "cuda" for m in st.channels.values())


def test_device_cuda_merges_cpu_models_as_the_cpu_does():
    """device="cuda" on CPU models: the result is on the CPU, in float32, with the CPU merge's assignments
    (up to near ties) and, to float32 rounding of different kernels, its function."""
    a, b, calib = _pair()
    on_cpu, rep_cpu = merge(a, b, calib, progress=False, return_report=True)
    on_gpu, rep_gpu = merge(a, b, calib, device="cuda", progress=False, return_report=True)
    p = next(on_gpu.parameters())
    assert p.device.type == "cpu" and p.dtype == torch.float32
    # other kernels sum in another order (~1e-7): an assignment may flip only between near-tied pairs, so
    # the optimum's value is what must agree (and almost every channel's partner)
    for g, r in rep_cpu.groups.items():
        assert rep_gpu.groups[g].mean_corr == pytest.approx(r.mean_corr, abs=1e-5), g
        assert rep_gpu.groups[g].moved == pytest.approx(r.moved, abs=0.05), g


def test_device_cuda_undoes_a_permutation_exactly_as_the_cpu_does():
    """B a channel-permuted copy of A: one right answer; on the GPU as on the CPU the merge finds every
    channel (the permutations are the same) and gives A's function back, as a CPU model."""
    a, _, calib = _pair()
    spec = trace_permutation_spec(a, calib[0][:1])
    b = permute(a, spec, random_perms(spec, torch.Generator().manual_seed(5)))
    _, rep_cpu = merge(a, b, calib, progress=False, return_report=True)
    on_gpu, rep_gpu = merge(a, b, calib, device="cuda", progress=False, return_report=True)
    assert {g: r.moved for g, r in rep_gpu.groups.items()} == {g: r.moved for g, r in rep_cpu.groups.items()}
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert _rel(on_gpu(x), a(x)) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_models_on_the_gpu_come_back_on_the_gpu_in_their_dtype(dtype):
    a, b, calib = _pair()
    a, b = a.to("cuda", dtype), b.to("cuda", dtype)
    merged, rep = merge(a, b, [x.cuda() for x in calib], progress=False, return_report=True)
    p = next(merged.parameters())
    assert p.device.type == "cuda" and p.dtype == dtype
    assert rep.sites and all(s.var_ratio_after is not None for s in rep.sites.values())
    with torch.no_grad():
        out = merged(calib[0].to("cuda", dtype))
    assert torch.isfinite(out.float()).all()
    assert next(a.parameters()).device.type == "cuda"  # the inputs are left as they were


def test_rotate_stream_on_the_device_undoes_a_rotated_copy():
    """rotate_stream with device="cuda": Procrustes and the folds run beside statistics on the device; a
    ViT whose stream was rotated comes back to A's function, as a CPU model."""
    timm = pytest.importorskip("timm")
    from mergekit_vision.match.rotation import procrustes_rotation, rotate_state_dict, stream_plans

    a = randomize_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                          embed_dim=48, depth=2, num_heads=3, num_classes=10).eval(), seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    plan = plan_calibration(a, x[:1])
    plans, _ = stream_plans(plan.spec, a, plan.gm, x[:1], [a.state_dict()])
    r = procrustes_rotation(torch.randn(48, 48, generator=g, dtype=torch.float64))
    b = randomize_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                          embed_dim=48, depth=2, num_heads=3, num_classes=10).eval())
    b.load_state_dict(rotate_state_dict(a.state_dict(), plans, {"patch_embed.proj": r}))
    calib = [torch.randn(32, 3, 32, 32, generator=g) for _ in range(4)]
    merged = merge(a, b, calib, repair=False, rotate_stream=True, device="cuda", progress=False)
    assert next(merged.parameters()).device.type == "cpu"
    assert _rel(merged(x), a(x)) < 1e-4
