"""The scorer warms its whole scoring path up on an example event of the spec (any spec), in a throwaway
pipeline: the example is scored, not rejected, and the real pipeline's entity state stays empty."""
from __future__ import annotations

import logging

from conftest import spec_codec
from streamscore.scoring.pipeline import ScoringPipeline
from streamscore.scoring.served_model import ServedModel
from streamscore.services.scorer.service import warm_up_scoring


def test_the_example_event_of_each_spec_is_scored_without_touching_the_real_state(any_spec, caplog):
    pipeline = ScoringPipeline(any_spec, spec_codec(any_spec), ServedModel(name="m", version=0))
    with caplog.at_level(logging.WARNING, logger="streamscore"):
        warm_up_scoring(pipeline)
    assert not [r for r in caplog.records if "warm" in r.getMessage()], caplog.text
    assert pipeline.states == {} and pipeline.entity_count() == 0


def test_a_warm_up_that_fails_is_logged_and_the_scorer_goes_on(payments_spec, caplog):
    pipeline = ScoringPipeline(payments_spec, spec_codec(payments_spec), ServedModel(name="m", version=0))

    def refuse(name, topic=None):
        raise ValueError("decimal needs a Decimal")

    pipeline.codec.encoder = refuse
    with caplog.at_level(logging.WARNING, logger="streamscore"):
        warm_up_scoring(pipeline)  # no exception
    assert "scoring not warmed up (ValueError: decimal needs a Decimal)" in caplog.text
