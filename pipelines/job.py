"""`python -m pipelines.job SPEC CONFIG_JSON`: a training run inside a Ray Job.

The training flows submit it (`pipelines.launch.launch_resolved`) with the whole resolved config
as JSON, so no config file needs to exist on the head. Here the config is validated again, its
inputs as the head sees them, and trained through its Prefect flow as `mmpipe train` does.
"""

from __future__ import annotations

import json
import os
import sys

from pipelines.commands import (
    check_prefect_api,
    prepare_environment,
    run_reporting_errors,
    train_config,
    train_with_progress,
)


def main(argv: list[str]) -> int:
    spec, config_json = argv
    prepare_environment()

    def run() -> int:
        check_prefect_api()
        train_with_progress(train_config(spec, None, values=json.loads(config_json)))
        return 0

    return run_reporting_errors(run, debug=os.environ.get("MMPIPE_DEBUG") == "1")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
