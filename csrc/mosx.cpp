// Operator schemas of the mosx library. Device implementations register themselves beside their
// kernels (cpu/*.cpp for CPU, cuda/*.cu for CUDA), so a CPU-only build needs no #ifdef here.
//
// Layout conventions shared by every op (see README "Conventions"):
//   logits  [N, L]  float64/float32/float16/bfloat16, unit stride along L (any row stride)
//   offsets [K + 1] int64, offsets[0] = 0, offsets[K] = L, group k owns logits
//                   offsets[k] .. offsets[k+1]-1; slot offsets[k] is the group's "others" logit
//   Reductions (scores, probabilities, losses, log-sum-exps) come back in the accumulation type:
//   float64 for float64 inputs, float32 otherwise.
#include <torch/library.h>

TORCH_LIBRARY(mosx, m) {
  // Per-group softmax (log=false) or log-softmax (log=true) of every slice. Output [N, L].
  m.def("group_softmax(Tensor logits, Tensor offsets, bool log) -> Tensor");
  // Backward of group_softmax given its output.
  m.def("group_softmax_backward(Tensor grad_out, Tensor out, Tensor offsets, bool log) -> Tensor");

  // MOS score -min_k p_others^k. Returns (score [N], argmin group [N] int64, log-sum-exp of
  // that group [N]); the last two are what the backward needs.
  m.def("group_softmax_score(Tensor logits, Tensor offsets) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_softmax_score_backward(Tensor grad_score, Tensor logits, Tensor offsets, "
      "Tensor min_group, Tensor min_lse) -> Tensor");

  // Group prediction: the most probable non-others class over all groups.
  // logit_class [L] int64 maps a logit position to its global class id (-1 for others slots).
  // Returns (class id [N] int64, its within-group probability [N], group [N] int64).
  m.def(
      "group_predict(Tensor logits, Tensor offsets, Tensor logit_class) -> (Tensor, Tensor, "
      "Tensor)");

  // Group cross-entropy, per sample and group, for M = 1 or 2 (mixup) target sets at once.
  // targets: [M, N] global class ids (rows equal to ignore_index are ignored), mapped to logit
  //          positions by class_logit [C]; or [M, N, K] per-group labels (0 = others, j+1 = the
  //          group's class j, ignore_index = ignored).
  // Returns (losses [M, N, K], 0 where ignored; lse [N, K]).
  m.def(
      "group_cross_entropy(Tensor logits, Tensor offsets, Tensor targets, Tensor class_logit, "
      "int ignore_index) -> (Tensor, Tensor)");
  // Gradient w.r.t. logits from the saved per-group log-sum-exp; grad_losses is [M, N, K].
  m.def(
      "group_cross_entropy_backward(Tensor grad_losses, Tensor logits, Tensor offsets, "
      "Tensor targets, Tensor class_logit, Tensor lse, int ignore_index) -> Tensor");

  // UMAP learned weight mask (masked_weight.h has the ranking and tie rule). Returns
  // (w_eff = where(mask, weight, 0), mask bool), mask keeping the clamp(round(keep * n), 1, n)
  // entries of largest |scores| in the layer, ties to the lower flat index.
  m.def("masked_weight(Tensor weight, Tensor scores, float keep) -> (Tensor, Tensor)");
  // Straight-through backward: [grad_scores = grad * weight * sign(scores)] if scores_grad, then
  // [grad_weight = where(mask, grad, 0)] if weight_grad (the list holds the requested ones).
  m.def(
      "masked_weight_backward(Tensor grad, Tensor weight, Tensor scores, Tensor mask, "
      "bool scores_grad, bool weight_grad) -> Tensor[]");
  // The device-agnostic ATen selection (T, c) that the CUDA op uses, for tests on any device.
  m.def("_masked_weight_threshold(Tensor scores, int k) -> (Tensor, Tensor)");

  // Which compiled variant the float CPU kernels run: "avx2" or "baseline" (chosen once, from the
  // CPU's features, or "baseline" when the environment sets MOSX_CPU_KERNELS=baseline).
  m.def("_cpu_kernels() -> str");
}
