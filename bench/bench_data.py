"""Build time of the offline benchmark data (mosx.data), from the fonts and OOD packages.

    pytest bench/bench_data.py --benchmark-only
Times one full build (planning, rendering, OOD sets, .npy + manifest) into a fresh temporary
folder: the quick setting (100 classes in 20 scripts, 200 train + 50 test images per class,
2,000 images per OOD set) and 400 classes. MOSX_BENCH_QUICK=1: 20 classes and 20 images per class
only. Skips when the Noto fonts are not installed (.ci/install_data_deps.sh installs them).
"""

import os
import shutil
import tempfile
import warnings

import pytest

from mosx.data import cache, glyphs

QUICK = os.environ.get("MOSX_BENCH_QUICK", "0") == "1"
SIZES = [20] if QUICK else [100, 400]

pytestmark = pytest.mark.skipif(
    not os.path.isdir(glyphs.DEFAULT_FONT_DIR),
    reason="apt-get install fonts-noto-core fonts-noto-extra (or .ci/install_data_deps.sh)",
)


@pytest.mark.parametrize("num_classes", SIZES)
def test_build_benchmark(benchmark, num_classes):
    settings = dict(train_per_class=20, test_per_class=20, ood_per_set=200) if QUICK else {}
    config = cache.BenchmarkConfig(num_classes=num_classes, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = cache.resolve(config)

    def run():
        out = tempfile.mkdtemp(prefix="mosx-bench-data-")
        try:
            return cache.build(config, out, progress=False)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    benchmark.group = "mosx data build"
    manifest = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    assert len(manifest["classes"]) == num_classes
    assert manifest["counts"]["train"] == num_classes * config.train_per_class
