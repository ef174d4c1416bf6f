"""training.specs: what every spec checks before a worker starts."""

import pytest

from training.config import TrainConfig
from training.registry import get_spec
from training.shards import DataError


@pytest.mark.parametrize("spec", ["clip", "dvae"])
def test_image_specs_refuse_code_sidecars(tmp_path, spec):
    cfg = TrainConfig(
        name="run",
        spec=spec,
        data={"source": f"file://{tmp_path}/", "codes": f"file://{tmp_path}/"},
    )
    with pytest.raises(DataError, match=f"data.codes: {spec} does not train on dVAE code"):
        get_spec(spec).check_inputs(cfg)
