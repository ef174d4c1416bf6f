"""training.config: specs come from the registry, and validating a config imports nothing heavy."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from training.config import TrainConfig
from training.registry import spec_names


def test_spec_must_be_registered_and_the_error_lists_the_known_ones():
    data = {"source": "file:///data/"}
    for name in spec_names():
        extra = {"dvae_checkpoint": "dvae.pt"} if name == "dalle" else {}
        assert TrainConfig(name="run", spec=name, data=data, **extra).spec == name
    with pytest.raises(
        ValidationError, match="unknown model spec 'nope'; known: clip, dvae, dalle"
    ):
        TrainConfig(name="run", spec="nope", data=data)
    with pytest.raises(ValidationError, match="spec 'dalle' needs dvae_checkpoint"):
        TrainConfig(name="run", spec="dalle", data=data)


def test_validating_a_config_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from training.config import EncodeConfig, TrainConfig\n"
        "from training.shards import DataError, check_data\n"
        "TrainConfig(name='run', data={'source': 'file:///data/'})\n"
        "EncodeConfig(source='file:///data/', dvae_checkpoint='dvae.pt', out='file:///codes/')\n"
        "heavy = ('torch', 'webdataset', 'ray', 'deepspeed', 'prefect')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_clip_uses_the_local_loss_above_the_configured_world_size():
    from training.config import LossSection
    from training.specs.clip import ClipSpec

    assert not LossSection().use_local_loss(8) and LossSection().use_local_loss(9)
    assert LossSection(local_loss_above=2).use_local_loss(4)
    assert not LossSection(local_loss=False).use_local_loss(64)
    assert LossSection(local_loss=True).use_local_loss(2)
    for workers, local in ((9, True), (2, False)):  # the spec's loss follows the config
        cfg = TrainConfig(name="run", data={"source": "file:///d/"}, scale={"num_workers": workers})
        spec = ClipSpec()
        spec.build(cfg)
        assert spec.contrastive.local_loss is local
