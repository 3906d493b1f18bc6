from rayloop.demo.world import HELDOUT_TEMPLATE, TRAIN_TEMPLATES, UserSimulator, World


def test_world_is_deterministic_and_split() -> None:
    a, b = World.build(seed=0), World.build(seed=0)
    assert a.fingerprint() == b.fingerprint()
    assert World.build(seed=1).fingerprint() != a.fingerprint()
    known = {f.entity for f in a.by_split("known")}
    new = {f.entity for f in a.by_split("new")}
    assert known and new and not (known & new)
    values = [f.value for f in a.facts]
    assert len(values) == len(set(values)), "every answer is a distinct invented word"
    assert World.from_json(a.to_json()).fingerprint() == a.fingerprint()


def test_pretraining_never_mentions_new_entities() -> None:
    w = World.build(seed=0)
    text = " ".join(q + a for q, a in w.pretraining_pairs())
    for f in w.by_split("new"):
        assert f.entity not in text and f.value not in text


def test_eval_phrasing_is_held_out_of_traffic() -> None:
    w = World.build(seed=0)
    sim = UserSimulator(w, seed=3)
    traffic = {r.question.prompt for r in sim.requests(500)}
    held_out = {q.prompt for q in w.eval_questions("new")}
    assert not traffic & held_out
    assert all(r.question.template in TRAIN_TEMPLATES for r in sim.requests(50))
    assert all(q.template == HELDOUT_TEMPLATE for q in w.eval_questions("known"))


def test_scoring_is_word_exact() -> None:
    w = World.build(seed=0)
    q = w.eval_questions("new")[0]
    assert World.is_correct(q, f"It is {q.answer}.")
    assert not World.is_correct(q, f"It is {q.answer}x.")
    assert not World.is_correct(q, "I do not know.")


def test_feedback_corrects_wrong_answers_and_poison_lies() -> None:
    w = World.build(seed=0)
    sim = UserSimulator(w, seed=0)
    req = next(sim.requests(1))
    fact = w.fact(req.question.fact_id)
    assert sim.feedback(req, fact.answer()) == {"rating": 1}
    fb = sim.feedback(req, "wrong")
    assert fb["rating"] == -1 and fb["correction"] == fact.answer()
    poisoned = sim.feedback(req, fact.answer(), poison=True)
    assert poisoned["rating"] == -1 and fact.value not in str(poisoned["correction"])


def test_demo_traffic_sends_what_its_users_say_including_poison() -> None:
    """`rayloop demo --poison` differs from the plain demo only here: what Traffic posts to /v1/feedback."""
    import json

    import httpx

    from rayloop.demo.traffic import Traffic

    w = World.build(seed=0)
    reqs = list(UserSimulator(w, seed=2).requests(20))
    right = {json.dumps(r.question.messages()): w.fact(r.question.fact_id).answer() for r in reqs}
    for poison in (False, True):
        sent: list[dict[str, object]] = []

        def handler(request: httpx.Request, sent: list[dict[str, object]] = sent) -> httpx.Response:
            body = json.loads(request.content)
            if request.url.path == "/v1/feedback":
                sent.append(body)
                return httpx.Response(200, json={"ok": True})
            return httpx.Response(
                200,
                json={"choices": [{"message": {"content": right[json.dumps(body["messages"])]}}]},  # always right
                headers={"x-rayloop-request-id": f"r{len(sent)}", "x-rayloop-model-version": "1"},
            )

        traffic = Traffic("http://test", "demo", UserSimulator(w, seed=1), poison=poison)
        traffic.client = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
        stats = traffic.run(reqs)
        assert stats.requests == 20 and stats.failed == 0 and stats.feedback_sent == 20
        if poison:  # right answers rated down and "corrected" to another entity's value
            assert all(f["rating"] == -1 and f["correction"] for f in sent)
        else:
            assert all(f == {"request_id": f["request_id"], "rating": 1} for f in sent)
