"""STFPM and DFM graphs: shapes, loss definition, and that training actually learns."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.backbones import build_backbone
from training.models.dfm import DfmModel
from training.models.image_score import ImageScore
from training.models.patch_memory import PatchMemory, locally_aware_patches
from training.models.patch_memory.torch_model import nearest_distance
from training.models.stfpm import StfpmModel, stfpm_loss
from training.models.stfpm.anomaly_map import anomaly_map
from training.models.stfpm.torch_model import combine_terms
from training.models.upsample import resize_bilinear


def tiny_stfpm(seed=0):
    torch.manual_seed(seed)
    teacher = build_backbone("mobilenet_v2", pretrained=False)
    student = build_backbone("mobilenet_v2", pretrained=False, bn_momentum=0.1)
    return StfpmModel(teacher, student)


def test_stfpm_forward_shapes_and_score_is_map_max():
    model = tiny_stfpm().eval()
    images = torch.rand(2, 3, 64, 96)
    amap, score = model(images)
    assert amap.shape == (2, 1, 64, 96)
    assert score.shape == (2,)
    torch.testing.assert_close(score, amap.amax(dim=(1, 2, 3)))
    assert torch.all(amap >= 0)


def test_stfpm_loss_matches_the_paper_definition():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    student = [torch.randn_like(t) for t in teacher]
    expected = 0.0
    for t, s in zip(teacher, student):
        t_n = t / t.norm(dim=1, keepdim=True)
        s_n = s / s.norm(dim=1, keepdim=True)
        h, w = t.shape[-2:]
        per_image = 0.5 / (h * w) * ((t_n - s_n) ** 2).sum(dim=(1, 2, 3))
        expected = expected + per_image.mean()
    torch.testing.assert_close(stfpm_loss(teacher, student), expected)
    assert float(stfpm_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_hard_quantile_loss_averages_only_the_hardest_positions():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)]
    student = [torch.randn_like(t) for t in teacher]
    student[0][0, :, 3, 5] = -teacher[0][0, :, 3, 5]  # the one position at the maximal distance, 2.0
    expected = 0.0
    for t, s in zip(teacher, student):
        distance = 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1).flatten()
        expected = expected + distance[distance >= torch.quantile(distance, 0.9)].mean()
    torch.testing.assert_close(stfpm_loss(teacher, student, hard_quantile=0.9), expected)
    assert float(stfpm_loss(teacher, student, hard_quantile=0.9)) > float(stfpm_loss(teacher, student))
    # the top of tap 0 is the planted position alone when the quantile leaves one of 512
    top_only = stfpm_loss(teacher[:1], student[:1], hard_quantile=0.999)
    assert float(top_only) == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="hard quantile"):
        stfpm_loss(teacher, student, hard_quantile=1.0)


def test_anomaly_map_is_product_of_upsampled_tap_maps():
    teacher = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    student = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    result = anomaly_map(teacher, student, size=(16, 16))
    maps = []
    for t, s in zip(teacher, student):
        distance = 0.5 * ((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2).sum(1, keepdim=True)
        maps.append(F.interpolate(distance, size=(16, 16), mode="bilinear", align_corners=False))
    torch.testing.assert_close(result, maps[0] * maps[1])
    torch.testing.assert_close(anomaly_map(teacher, student, size=(16, 16), combine="sum"), maps[0] + maps[1])
    torch.testing.assert_close(anomaly_map(teacher, student, size=(16, 16), taps=(1,)), maps[1])
    with pytest.raises(ValueError, match="combine"):
        anomaly_map(teacher, student, size=(16, 16), combine="mean")


@pytest.mark.parametrize("size_in, size_out", [((4, 4), (64, 64)), ((16, 16), (256, 256)), ((12, 20), (96, 160)),
                                                ((30, 30), (17, 45))])
def test_resize_is_pytorchs_bilinear(size_in, size_out):
    maps = torch.rand(2, 1, *size_in)
    expected = F.interpolate(maps, size=size_out, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_bilinear(maps, size_out), expected, atol=1e-5, rtol=1e-5)


def test_teacher_stays_frozen_in_train_mode():
    model = tiny_stfpm()
    model.train()
    assert not model.teacher.training
    assert model.student.training
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_training_reduces_the_loss_and_the_teacher_does_not_move():
    model = tiny_stfpm()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    images = torch.rand(8, 3, 64, 64)
    optimizer = torch.optim.SGD(model.student.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4)
    model.train()
    losses = []
    for _ in range(15):
        loss = stfpm_loss(*model.features(images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for key, value in model.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key])


def fitted_dfm(score_type="fre", n_images=12):
    torch.manual_seed(0)
    model = DfmModel(build_backbone("mobilenet_v2", pretrained=False), taps=(2,), score_type=score_type)
    normal = torch.rand(n_images, 3, 64, 64) * 0.1 + 0.45
    with torch.no_grad():
        features = model.tap_features(normal).reshape(n_images, -1).numpy()
    model.fit(features, variance_ratio=0.97)
    return model.eval(), normal


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_dfm_shapes_and_outlier_scores_higher(score_type):
    model, normal = fitted_dfm(score_type)
    assert 1 <= model.n_components < 12
    amap, score = model(normal[:2])
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,)
    outlier = normal[:2].clone()
    outlier[:, :, 16:40, 16:40] = torch.rand(2, 3, 24, 24)
    outlier_map, outlier_score = model(outlier)
    assert torch.all(outlier_score > score.max())
    # the map peaks inside the pasted patch
    peak = np.unravel_index(int(outlier_map[0, 0].argmax()), (64, 64))
    assert 8 <= peak[0] <= 48 and 8 <= peak[1] <= 48


def test_dfm_fre_equals_reconstruction_error_from_sklearn_pca():
    from sklearn.decomposition import PCA

    model, normal = fitted_dfm("fre")
    unseen = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        train_features = model.tap_features(normal).reshape(len(normal), -1).numpy().astype(np.float64)
        features = model.tap_features(unseen).reshape(len(unseen), -1).numpy().astype(np.float64)
        _, score = model(unseen)
    pca = PCA(n_components=0.97, svd_solver="full").fit(train_features)
    reconstructed = pca.inverse_transform(pca.transform(features))
    expected = ((features - reconstructed) ** 2).sum(axis=1)
    assert expected.min() > 0
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-3)


def test_dfm_backbone_is_frozen():
    model, _ = fitted_dfm()
    model.train()
    assert not model.extractor.training


def test_dfm_rejects_unknown_score_type():
    with pytest.raises(ValueError, match="score_type"):
        DfmModel(build_backbone("mobilenet_v2", pretrained=False), score_type="bogus")


def stfpm_with_subspace(weight=2.0, n_images=12):
    """An STFPM whose subspace term is a DFM fitted on its own teacher's features of plain images."""
    torch.manual_seed(0)
    teacher = build_backbone("mobilenet_v2", pretrained=False)
    student = build_backbone("mobilenet_v2", pretrained=False, bn_momentum=0.1)
    subspace = DfmModel(teacher, taps=(1,), pool=2, score_type="map")
    normal = torch.rand(n_images, 3, 64, 64) * 0.1 + 0.45
    with torch.no_grad():
        subspace.fit(subspace.tap_features(normal).reshape(n_images, -1).numpy())
    return StfpmModel(teacher, student, subspace=subspace, subspace_weight=weight).eval(), normal


def test_subspace_term_is_added_to_the_scaled_discrepancy_and_shares_the_teacher():
    model, normal = stfpm_with_subspace(weight=2.0)
    assert model.subspace.extractor is model.teacher  # one teacher pass feeds both terms
    model.map_scales.copy_(torch.tensor([0.5, 4.0]))
    with torch.no_grad():
        amap, score = model(normal[:3])
        teacher, student = model.features(normal[:3])
        discrepancy = anomaly_map(teacher, student, size=(64, 64))
        subspace_map, _ = model.subspace(normal[:3])  # DFM's own map of the same features (no smoothing)
    torch.testing.assert_close(amap, discrepancy / 0.5 + 2.0 * subspace_map / 4.0)
    torch.testing.assert_close(score, amap.amax(dim=(1, 2, 3)))
    assert "map_scales" in model.state_dict() and "map_scales" not in tiny_stfpm().state_dict()


def test_subspace_term_raises_the_score_of_an_image_off_the_normal_subspace():
    model, normal = stfpm_with_subspace(weight=1.0)
    outlier = normal[:2].clone()
    outlier[:, :, 16:40, 16:40] = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        _, normal_error = model.term_maps(normal[:2])
        _, outlier_error = model.term_maps(outlier)
    assert torch.all(outlier_error.amax(dim=(1, 2, 3)) > normal_error.amax(dim=(1, 2, 3)).max())


def test_subspace_weight_and_subspace_come_together():
    model, _ = stfpm_with_subspace()
    with pytest.raises(ValueError, match="subspace"):
        StfpmModel(model.teacher, model.student, subspace=model.subspace, subspace_weight=0.0)
    with pytest.raises(ValueError, match="subspace"):
        StfpmModel(model.teacher, model.student, subspace_weight=1.0)


def stfpm_with_memory(student_pool=2):
    """The subspace model plus a memory of its teacher's patches of the same plain images at full size
    (twice the subspace's: pooled by 2 they are exactly the images its PCA was fitted on)."""
    model, small = stfpm_with_subspace(weight=2.0)
    normal = F.interpolate(small, scale_factor=student_pool, mode="nearest")
    with torch.no_grad():
        patches = locally_aware_patches(model.teacher(normal))
    memory = PatchMemory()
    memory.memory = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
    return StfpmModel(model.teacher, model.student, subspace=model.subspace, subspace_weight=2.0, memory=memory,
                      memory_weight=3.0, student_pool=student_pool).eval(), normal


def test_nearest_distance_is_the_distance_to_the_closest_memory_patch():
    generator = torch.Generator().manual_seed(1)
    patches = torch.randn(2, 5, 3, 4, generator=generator)
    memory = torch.randn(7, 5, generator=generator)
    expected = torch.cdist(patches.permute(0, 2, 3, 1).reshape(-1, 5), memory).amin(1).reshape(2, 1, 3, 4)
    torch.testing.assert_close(nearest_distance(patches, memory), expected, atol=1e-4, rtol=1e-4)
    assert nearest_distance(memory[:1].view(1, 5, 1, 1), memory).item() == pytest.approx(0, abs=1e-3)


def test_memory_term_is_added_scaled_and_sees_the_full_input_while_the_student_sees_it_pooled():
    model, normal = stfpm_with_memory(student_pool=2)
    model.map_scales.copy_(torch.tensor([0.5, 4.0, 2.0]))
    with torch.no_grad():
        amap, score = model(normal[:3])
        small = F.avg_pool2d(normal[:3], 2)
        teacher, student = model.teacher(small), model.student(small)
        discrepancy = anomaly_map(teacher, student, size=(128, 128))
        subspace_map = model.subspace.error_map(teacher, (128, 128))
        memory_map = model.memory.error_map(model.teacher(normal[:3]), (128, 128))
    assert amap.shape == (3, 1, 128, 128)
    torch.testing.assert_close(amap, discrepancy / 0.5 + 2.0 * subspace_map / 4.0 + 3.0 * memory_map / 2.0)
    torch.testing.assert_close(score, amap.amax(dim=(1, 2, 3)))
    assert memory_map.abs().max() < 1e-2  # the memory holds these very images' patches


@pytest.mark.parametrize("scoring", [ImageScore(), ImageScore(4.0, "topk", 0.01)], ids=["max", "smoothed-topk"])
def test_memory_fused_by_score_adds_its_own_score_to_the_student_terms_map_score(scoring):
    model, normal = stfpm_with_memory(student_pool=2)
    model.image_score = scoring
    model.map_scales.copy_(torch.tensor([0.5, 4.0, 2.0]))
    images = normal[:3].clone()
    images[:, :, 8:24, 8:24] = 1.0  # a bright patch: the terms peak, at pixels of their own grids
    with torch.no_grad():
        by_map = model(images)
        model.memory_fusion = "score"
        amap, score = model(images)
        discrepancy, subspace_map, memory_map = model.term_maps(images)
        student_terms = combine_terms([discrepancy, subspace_map], model.map_scales, [1.0, 2.0])
    torch.testing.assert_close(amap, by_map[0])  # the map is the same (the blur is linear)
    torch.testing.assert_close(score, scoring(student_terms)[1] + 3.0 * scoring(memory_map)[1] / 2.0)
    assert not torch.allclose(score, by_map[1])  # and the score is not the summed map's
    with pytest.raises(ValueError, match="memory fusion"):
        StfpmModel(model.teacher, model.student, memory=model.memory, memory_weight=1.0, memory_fusion="mean")


def test_memory_term_raises_a_patch_no_normal_image_had():
    model, normal = stfpm_with_memory()
    outlier = normal[:2].clone()
    outlier[:, :, 32:80, 32:80] = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        normal_distance = model.term_maps(normal[2:4])[2]
        outlier_distance = model.term_maps(outlier)[2]
    assert torch.all(outlier_distance.amax(dim=(1, 2, 3)) > 10 * normal_distance.amax(dim=(1, 2, 3)).max())


def test_memory_weight_and_memory_come_together():
    model, _ = stfpm_with_memory()
    with pytest.raises(ValueError, match="memory"):
        StfpmModel(model.teacher, model.student, memory=model.memory, memory_weight=0.0)
    with pytest.raises(ValueError, match="memory"):
        StfpmModel(model.teacher, model.student, memory_weight=1.0)
    with pytest.raises(ValueError, match="student_pool"):
        StfpmModel(model.teacher, model.student, student_pool=0)
