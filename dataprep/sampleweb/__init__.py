"""The sample web: a deterministic captioned-image corpus with labelled faults, served on loopback.

See :mod:`dataprep.sampleweb.corpus` (specs, rendering, ground truth),
:mod:`dataprep.sampleweb.server` (HTTP server, URL list, ``serve_forever``) and
:mod:`dataprep.sampleweb.zoo` (odd real-world URLs, each with its expected crawl outcome).
"""

from dataprep.sampleweb.corpus import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOUR_RGB,
    COLOURS,
    DEFAULT_FAULT_RATES,
    FAULTS,
    FETCHABLE_FAULTS,
    POSITIONS,
    SHAPES,
    SIZES,
    SampleSpec,
    generate_corpus,
    ground_truth_table,
    make_caption,
    render_image,
)
from dataprep.sampleweb.server import (
    SampleWebServer,
    serve_forever,
    write_ground_truth,
    write_url_list,
)
from dataprep.sampleweb.zoo import ZOO_CASES, ZooCase, write_zoo_url_list, zoo_table

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_RGB",
    "CAPTION_TEMPLATES",
    "COLOURS",
    "COLOUR_RGB",
    "DEFAULT_FAULT_RATES",
    "FAULTS",
    "FETCHABLE_FAULTS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SampleSpec",
    "SampleWebServer",
    "ZOO_CASES",
    "ZooCase",
    "generate_corpus",
    "ground_truth_table",
    "make_caption",
    "render_image",
    "serve_forever",
    "write_ground_truth",
    "write_url_list",
    "write_zoo_url_list",
    "zoo_table",
]
