"""The logger warms its block writer up on an example Prediction of the spec (any spec), and a schema the
example cannot fill never keeps it from starting."""
from __future__ import annotations

import logging

from streamscore.services.logger.service import LoggerService
from streamscore.settings import Settings


def test_the_example_prediction_of_each_spec_is_written(tmp_path, any_spec, caplog):
    logger = LoggerService(Settings(data_dir=tmp_path), store=object(), spec=any_spec)  # no store is touched
    with caplog.at_level(logging.WARNING, logger="streamscore"):
        logger.warm_up()
    assert not [r for r in caplog.records if "warm" in r.getMessage()], caplog.text


def test_a_warm_up_that_fails_is_logged_and_the_logger_goes_on(tmp_path, payments_spec, caplog):
    logger = LoggerService(Settings(data_dir=tmp_path), store=object(), spec=payments_spec)

    def refuse(name, topic=None):
        raise ValueError("decimal needs a Decimal")

    logger.codec.encoder = refuse
    with caplog.at_level(logging.WARNING, logger="streamscore"):
        logger.warm_up()  # no exception
    assert "block writer not warmed up (ValueError: decimal needs a Decimal)" in caplog.text
