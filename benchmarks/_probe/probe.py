import sys, time, json
from drift_core.schemas import ArithConfig, DataConfig, ModelConfig, EngineConfig, ProtocolConfig, SamplingConfig, VerifierConfig
from tasks.ingest import load_problems
from tasks.models import resolve_model
from tasks.engines.transformers_engine import TransformersEngine
from tasks.rollout import run_episodes
from tasks.grade import Grader

def main():
    mc = ModelConfig(path="builtin:smollm2-135m-instruct")
    path = resolve_model(mc)
    eng = TransformersEngine(path, mc, EngineConfig(batch_size=64))
    grader = Grader(ProtocolConfig(), VerifierConfig(kind=__import__("os").environ.get("VK","math")))
    variants = json.loads(sys.argv[1])
    for v in variants:
        arith = ArithConfig(**v["arith"])
        res = load_problems(DataConfig(source="builtin:arith", arith=arith))
        df = res[0] if isinstance(res, tuple) else res
        rows = df.head(v.get("n", 24)).select("prompt_id", "question", "gold").to_dicts()
        proto = ProtocolConfig(max_turns=v.get("turns", 1), task_instruction=v.get("instr"), system_prompt=v.get("sys", "You are a helpful assistant."))
        samp = SamplingConfig(temperature=v.get("temp", 1.0), top_p=v.get("top_p", 1.0), max_new_tokens=v.get("mnt", 16))
        grader.protocol = proto; grader._protocol_json = proto.model_dump_json()
        t = time.perf_counter()
        recs = run_episodes(eng, eng.tokenizer, rows, proto, samp, v.get("k", 4), proto.max_turns, grader, seed=0)
        dt = time.perf_counter() - t
        T = proto.max_turns
        n = len(recs)
        by = [sum(1 for r in recs if r.solved and r.n_turns <= t) / n for t in range(1, T + 1)]
        t1 = sum(1 for r in recs if r.turn_correct[0]) / n
        valid = sum(sum(r.turn_valid) for r in recs) / sum(r.n_turns for r in recs)
        toks = sum(sum(r.gen_tokens) for r in recs)
        groups = {}
        for r in recs: groups.setdefault(r.prompt_id, []).append(r.solved)
        mixed = sum(1 for g in groups.values() if any(g) and not all(g)) / len(groups)
        anyok = sum(1 for g in groups.values() if any(g)) / len(groups)
        print(json.dumps({"v": v, "t1": round(t1,3), "solved_by": [round(x,3) for x in by], "valid": round(valid,3), "mixed_groups": round(mixed,3), "any_ok": round(anyok,3), "sec": round(dt,1), "tok_s": round(toks/dt,1)}), flush=True)
        for r in recs[:3]:
            print("   ", rows[0]["question"] if r is recs[0] else "", [m.content[:60] for m in r.messages if m.role == "assistant"], r.turn_correct, flush=True)

if __name__ == '__main__':
    main()
