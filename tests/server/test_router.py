"""The router's message handling, with a stand-in engine (no model)."""

from lightllm_plugin.engine.outputs import TokenEvent
from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server.protocol import (
    AbortRequest,
    AddRequest,
    ApiInbox,
    DetokenizeForget,
    DetokenizerInbox,
    DetokenizeStart,
    EngineStats,
    FinishRequest,
    RequestError,
    TokenBatch,
    decoder_for,
)
from lightllm_plugin.server.router import Router


class FakeCore:
    def __init__(self):
        self.live: dict[int, int] = {}  # req id -> tokens left
        self.total_slots = 100
        self.pooler = None  # a generation model, as EngineCore says
        self.failed: list[tuple[int, str]] = []  # ended by the engine itself, as EngineCore.take_failed says

    def add_request(self, req_id, prompt_ids, params, images=None):
        if len(prompt_ids) > 4:
            raise ValueError("the prompt has 5 tokens, more than max_req_input_len=4")
        self.live[req_id] = params.max_new_tokens

    def abort(self, req_id):
        return self.live.pop(req_id, None) is not None

    def take_failed(self):
        failed, self.failed = self.failed, []
        return failed

    finish = abort

    def has_unfinished(self):
        return bool(self.live)

    def step(self):
        events = []
        for req_id in list(self.live):
            self.live[req_id] -= 1
            done = self.live[req_id] == 0
            events.append(TokenEvent(req_id, 7, None, None, "length" if done else None, 1, 1))
            if done:
                del self.live[req_id]
        return events

    num_running = property(lambda self: len(self.live))
    num_waiting = property(lambda self: 0)
    used_slots = property(lambda self: 3 * len(self.live))
    # no prefix cache
    prefix_cache = None
    cache_query_tokens = cache_hit_tokens = cached_slots = 0


class Sink:
    def __init__(self, inbox):
        self.decoder = decoder_for(inbox)
        self.messages = []

    def send(self, frame):
        self.messages.append(self.decoder.decode(frame))


def make_router():
    detok, api = Sink(DetokenizerInbox), Sink(ApiInbox)
    return Router(FakeCore(), detok, api), detok.messages, api.messages


def add(req_id, prompt=(1, 2), **params):
    return AddRequest(req_id=req_id, prompt_ids=list(prompt), params=SamplingParams(max_new_tokens=2, stop=["x"], **params))


def test_an_added_request_is_announced_to_the_detokenizer_before_its_tokens():
    router, detok, _ = make_router()
    router.handle(add(1))
    router.step()
    assert isinstance(detok[0], DetokenizeStart) and detok[0].stop == ["x"] and detok[0].prompt_tail == [1, 2]
    assert isinstance(detok[1], TokenBatch) and detok[1].events[0].req_id == 1


def test_a_refused_add_goes_back_to_the_api_as_an_error():
    router, detok, api = make_router()
    router.handle(add(1, prompt=range(5)))
    assert detok == [] and isinstance(api[0], RequestError)
    assert api[0].req_ids == [1] and "max_req_input_len" in api[0].message


def test_a_request_the_engine_ends_itself_goes_back_to_the_api_as_an_error_at_once():
    router, detok, api = make_router()
    router.handle(add(1))
    router.handle(add(2))
    # what EngineCore does with a grammar that parsed but did not compile
    router.core.abort(1)
    router.core.failed.append((1, "structured_outputs: the regex could not be compiled: out of memory"))
    router.step()
    assert DetokenizeForget(req_ids=[1]) in detok
    errors = [m for m in api if isinstance(m, RequestError)]
    assert errors == [RequestError(req_ids=[1], message="structured_outputs: the regex could not be compiled: out of memory")]
    assert errors[0].status == 400
    assert [e.req_id for m in detok if isinstance(m, TokenBatch) for e in m.events] == [2]


def test_abort_frees_the_request_and_tells_the_detokenizer():
    router, detok, _ = make_router()
    router.handle(add(1))
    router.handle(AbortRequest(req_ids=[1]))
    assert not router.core.has_unfinished()
    assert detok[-1] == DetokenizeForget(req_ids=[1])


def test_an_abort_that_overtakes_its_add_still_wins():
    router, detok, _ = make_router()
    router.handle(AbortRequest(req_ids=[5]))
    router.handle(add(5))
    assert not router.core.has_unfinished() and detok == []


def test_finish_from_the_detokenizer_stops_the_request():
    router, _, _ = make_router()
    router.handle(add(1))
    router.handle(FinishRequest(req_id=1))
    assert not router.core.has_unfinished()


def test_stats_are_sent_on_change_only():
    router, _, api = make_router()
    router.report_stats(force=True)
    router.report_stats(force=True)
    router.handle(add(1))
    router.report_stats(force=True)
    stats = [m for m in api if isinstance(m, EngineStats)]
    assert stats == [EngineStats(0, 0, 0, 100), EngineStats(1, 0, 3, 100)]
