"""``train_production`` takes the URLs a study takes."""

from __future__ import annotations

import pytest

TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 1, "device": "cpu"}


@pytest.mark.slow
def test_train_production_accepts_a_plain_postgresql_tracking_url(study_dir, postgres_db, one_torch_thread):
    """A plain ``postgresql://`` URL works for a study (the installed driver is chosen); it must work for
    the production run too (with only psycopg2 installed, MLflow alone would look for psycopg 3)."""
    from mlflow import MlflowClient

    from wus_tune._study.storage import tracking_url
    from wus_tune.config import TrainConfig
    from wus_tune.production import train_production

    assert postgres_db.startswith("postgresql://")
    run = train_production(TrainConfig.from_dict(TINY), tracking_uri=postgres_db, log_model=False,
                           out_dir=study_dir / "prod", progress=False)  # fmt: skip
    assert run.run_id
    finished = MlflowClient(tracking_uri=tracking_url(postgres_db)).get_run(run.run_id)
    assert finished.info.status == "FINISHED"
