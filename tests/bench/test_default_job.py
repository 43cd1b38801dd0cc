"""`python -m rsae.bench default`: registered under its name, stages split from the timer's events.
(The benchmark itself runs the real default job for minutes; not run here.)"""

import pytest

from rsae.bench import __main__ as bench_main
from rsae.bench.default_job import stage_times


def test_default_is_a_registered_benchmark(capsys):
    assert "default" in bench_main.available() and "default_job" not in bench_main.available()
    with pytest.raises(SystemExit) as exit_:
        bench_main.main(["default", "--help"])
    assert exit_.value.code == 0 and "harvest" in capsys.readouterr().out


def test_validation_inside_fit_is_not_counted_as_training():
    events = [{"event": "train_start", "t": 10.0}, {"event": "val_start", "t": 20.0}, {"event": "val_end", "t": 25.0},
              {"event": "train_end", "t": 40.0}, {"event": "val_start", "t": 41.0}, {"event": "val_end", "t": 50.0}]
    s = stage_times(events, harvest_s=8.0, total_s=60.0)
    assert s["training"] == 25.0 and s["validation"] == 14.0 and s["validations"] == 2
    assert s["other"] == 60.0 - 8.0 - 25.0 - 14.0
