// C++ test of the mosx op library through the torch dispatcher: every op is compared with a
// direct ATen computation of the paper's formula on a small uneven layout.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect_close(const at::Tensor& a, const at::Tensor& b, const char* what, double tol = 1e-9) {
  const bool ok =
      a.sizes() == b.sizes() && at::allclose(a.to(at::kDouble), b.to(at::kDouble), tol, tol);
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace

int main() {
  // Groups of 3, 1 and 5 classes: offsets [0, 4, 6, 12].
  const std::vector<int64_t> off = {0, 4, 6, 12};
  const int64_t K = 3, N = 7, L = 12;
  const at::Tensor offsets = at::tensor(off, at::kLong);
  at::manual_seed(0);
  const at::Tensor x = at::randn({N, L}, at::kDouble) * 3;

  // Direct formulas: per-group softmax, others probability, per-group lse.
  std::vector<at::Tensor> probs, lses;
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor s = x.slice(1, off[k], off[k + 1]);
    probs.push_back(at::softmax(s, 1));
    lses.push_back(at::logsumexp(s, {1}));
  }
  const at::Tensor softmax_ref = at::cat(probs, 1);
  std::vector<at::Tensor> others;
  for (auto& p : probs) others.push_back(p.select(1, 0));
  const at::Tensor score_ref = -std::get<0>(at::stack(others, 1).min(1));

  auto softmax =
      op("mosx::group_softmax").typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>();
  expect_close(softmax.call(x, offsets, false), softmax_ref, "group_softmax");
  expect_close(softmax.call(x, offsets, true), softmax_ref.log(), "group_softmax (log)");

  auto score = op("mosx::group_softmax_score")
                   .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                         const at::Tensor&)>();
  expect_close(std::get<0>(score.call(x, offsets)), score_ref, "group_softmax_score");

  // Cross-entropy for class ids: class c of group g has label within+1 in g, 0 elsewhere.
  const at::Tensor class_logit =
      at::tensor(std::vector<int64_t>{1, 2, 3, 5, 7, 8, 9, 10, 11}, at::kLong);
  const at::Tensor targets =
      at::tensor(std::vector<int64_t>{0, 3, 8, 2, 4, 6, 1}, at::kLong).view({1, N});
  auto ce = op("mosx::group_cross_entropy")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, const at::Tensor&,
                                                          int64_t)>();
  auto [losses, lse] = ce.call(x, offsets, targets, class_logit, -100);
  at::Tensor loss_ref = at::zeros({N}, at::kDouble);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t pos = class_logit[targets[0][i].item<int64_t>()].item<int64_t>();
    for (int64_t k = 0; k < K; ++k) {
      const int64_t slot = (pos >= off[k] && pos < off[k + 1]) ? pos : off[k];
      loss_ref[i] += lses[k][i] - x[i][slot];
    }
  }
  expect_close(losses.sum({0, 2}), loss_ref, "group_cross_entropy");
  expect_close(lse, at::stack(lses, 1), "group_cross_entropy lse");

  // Bad offsets raise a clear error.
  bool raised = false;
  try {
    score.call(x, at::tensor(std::vector<int64_t>{0, 4, 6, 11}, at::kLong));
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("offsets end at 11") != std::string::npos;
  }
  std::printf("%s bad offsets raise\n", raised ? "ok  " : "FAIL");
  failures += !raised;

  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
