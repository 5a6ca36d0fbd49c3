"""Which grammar engine constrains decoding here: xgrammar or llguidance, by measured cost.

    python -m bench.grammar [--batch 32] [--vocab 32000]

Both engines get the same Hugging Face tokenizer: a byte-level BPE of `--vocab` tokens trained
on the fly (on this Python's standard library sources, so the vocabulary has realistic merges
of code, JSON punctuation and words; no download), and the same JSON schemas. For each engine:

- compile: wall time from schema text to a ready matcher (median of 8 schemas, cold cache);
- mask: wall time per decode step to fill the token bitmask of `--batch` constrained rows
  (each row a different schema, at a different place in its document), advancing every row
  by one token of a valid compact document per step - serial, and with the engine's own
  parallel batch call (2 threads);
- apply: adding the bitmask to a [batch, vocab] float32 logits tensor (each engine's CPU op);
- valid: random walks on the tiny model's byte-level tokenizer (each step a uniformly random
  allowed token, up to 300) until the engine allows the end of sequence and the walk takes it:
  how many finished documents `json.loads` and `jsonschema` accept. A grammar engine must never
  allow an invalid document.

Results go to bench/results/grammar.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "number"}, "maxItems": 8}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["id", "tags"], "additionalProperties": False}}, "required": ["user"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                                "required": ["x", "y"], "additionalProperties": False}, "maxItems": 6},
    {"type": "object", "properties": {"city": {"type": "string"}, "temperature": {"type": "number"},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}},
     "required": ["city", "temperature", "unit"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string"}, "pages": {"type": "integer", "minimum": 1},
                                      "authors": {"type": "array", "items": {"type": "string"}}},
     "required": ["title", "pages", "authors"], "additionalProperties": False},
    {"type": "object", "properties": {"steps": {"type": "array", "items": {"type": "object", "properties": {
        "action": {"type": "string"}, "done": {"type": "boolean"}}, "required": ["action", "done"],
        "additionalProperties": False}}}, "required": ["steps"], "additionalProperties": False},
]
DOCUMENTS = [
    {"name": "Ada Lovelace, Countess of Lovelace", "age": 36},
    {"items": [1.5, 2.25, -3.0, 4e-05, 1000, 6.5, 7, 8.125]},
    {"color": "green", "ok": True},
    {"user": {"id": 123456, "tags": ["alpha", "beta", "gamma delta", "epsilon"]}},
    [{"x": 1, "y": 2}, {"x": 30, "y": -4}, {"x": 500, "y": 6000}],
    {"city": "San Francisco", "temperature": 18.5, "unit": "celsius"},
    {"title": "The Art of Computer Programming", "pages": 672, "authors": ["Donald E. Knuth"]},
    {"steps": [{"action": "open the file", "done": True}, {"action": "read every line", "done": False}]},
]


def train_tokenizer(vocab: int, out: Path):
    """A byte-level BPE (GPT-2 style, like the tiny model's) trained on the stdlib sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in Path(json.__file__).resolve().parent.parent.glob("*.py"))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    tok.save(str(out / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def byte_tokenizer(out: Path):
    from transformers import AutoTokenizer

    from moe_parallel.loading.tiny import tiny_config, write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, tiny_config())
    return AutoTokenizer.from_pretrained(str(out))


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def matcher(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                        separators=(",", ":"))
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, batch: int):
        return self.xgr.allocate_token_bitmask(batch, self.vocab)

    def fill(self, matchers, bitmask) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def fill_parallel(self, matchers, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def start_parallel(self):
        self.batch = self.xgr.BatchGrammarMatcher(max_threads=2)

    def accept(self, m, token: int) -> None:
        assert m.accept_token(token), "xgrammar refused a token of a valid document"

    def allowed(self, m, bitmask) -> list[int]:
        m.fill_next_token_bitmask(bitmask, 0)
        return _bits(bitmask[0], self.vocab)

    def done(self, m) -> bool:
        return m.is_terminated()

    def apply(self, logits, bitmask) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.llt, self.vocab = llguidance, llguidance.torch, vocab
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def matcher(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                              defaults={"whitespace_flexible": False})
        m = self.ll.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    def bitmask(self, batch: int):
        return self.llt.allocate_token_bitmask(batch, self.tok.vocab_size)

    def fill(self, matchers, bitmask) -> None:
        for i, m in enumerate(matchers):
            self.llt.fill_next_token_bitmask(m, bitmask, i)

    def start_parallel(self):
        self.executor = self.ll.LLExecutor(num_threads=2)

    def fill_parallel(self, matchers, bitmask) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, m, token: int) -> None:
        assert m.consume_token(token), f"llguidance refused a token of a valid document: {m.get_error()}"

    def allowed(self, m, bitmask) -> list[int]:
        self.llt.fill_next_token_bitmask(m, bitmask, 0)
        return _bits(bitmask[0], self.vocab)

    def done(self, m) -> bool:
        return m.is_stopped()

    def apply(self, logits, bitmask) -> None:
        self.llt.apply_token_bitmask_inplace(logits, bitmask)


def _bits(row: torch.Tensor, vocab: int) -> list[int]:
    words = row.tolist()
    return [t for t in range(vocab) if (words[t // 32] >> (t % 32)) & 1]


# bounded strings and arrays, so that random walks finish
WALK_SCHEMAS = [
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5},
                                      "i": {"type": "integer", "minimum": -3, "maximum": 120},
                                      "f": {"type": "number", "minimum": 0.5, "maximum": 2.5},
                                      "a": {"type": "array", "items": {"type": "boolean"}, "minItems": 1,
                                            "maxItems": 3},
                                      "e": {"enum": ["x", "y", 3]}},
     "required": ["s", "i", "f", "a", "e"], "additionalProperties": False},
    {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {"k": {"type": "string",
                                                                                      "maxLength": 3}},
                                               "required": ["k"], "additionalProperties": False}},
]


def validity(engine, tokenizer, walks: int = 20) -> tuple[int, int]:
    """(documents finished, documents valid) over random walks of schemas with bounded strings,
    on the tiny model's byte-level tokenizer (every byte is a token, control characters too)."""
    import jsonschema

    rng = random.Random(0)
    finished = valid = 0
    eos = tokenizer.eos_token_id
    for schema in WALK_SCHEMAS:
        for _ in range(walks):
            m, out, bitmask = engine.matcher(schema), [], engine.bitmask(1)
            for _ in range(300):
                allowed = engine.allowed(m, bitmask)
                token = rng.choice(allowed)
                if token == eos:
                    break
                engine.accept(m, token)
                out.append(token)
            else:
                continue
            finished += 1
            try:
                jsonschema.validate(json.loads(tokenizer.decode(out)), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    return finished, valid


def measure(engine, tokenizer, batch: int, vocab: int) -> dict:
    compile_s = []
    for schema in SCHEMAS:
        start = time.perf_counter()
        engine.matcher(schema)
        compile_s.append(time.perf_counter() - start)
    docs = [tokenizer(json.dumps(d, separators=(",", ":")), add_special_tokens=False).input_ids for d in DOCUMENTS]
    rows = [(i % len(SCHEMAS), (i * 3) % 5) for i in range(batch)]  # schema, tokens already in the document
    results = {"compile_ms": 1000 * statistics.median(compile_s)}
    engine.start_parallel()
    for mode in ("serial", "parallel"):
        matchers, positions = [], []
        for s, skip in rows:
            m = engine.matcher(SCHEMAS[s])
            for t in docs[s][:skip]:
                engine.accept(m, t)
            matchers.append(m)
            positions.append(skip)
        bitmask = engine.bitmask(batch)
        fill = engine.fill if mode == "serial" else engine.fill_parallel
        times = []
        for _ in range(min(len(d) for d in docs) - 5):
            start = time.perf_counter()
            fill(matchers, bitmask)
            times.append(time.perf_counter() - start)
            for i, (m, (s, _)) in enumerate(zip(matchers, rows, strict=True)):
                engine.accept(m, docs[s][positions[i]])
                positions[i] += 1
        results[f"mask_{mode}_ms"] = 1000 * statistics.median(times)
    logits = torch.randn(batch, vocab)
    apply = []
    for _ in range(50):
        x = logits.clone()
        start = time.perf_counter()
        engine.apply(x, bitmask)
        apply.append(time.perf_counter() - start)
    results["apply_ms"] = 1000 * statistics.median(apply)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tokenizer = train_tokenizer(args.vocab, Path(tmp))
        print(f"trained a {len(tokenizer)}-token byte-level BPE in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        tiny = byte_tokenizer(Path(tmp) / "tiny")
        rows = {}
        for cls in (XGrammar, LLGuidance):
            engine = cls(tokenizer, len(tokenizer))
            measure(engine, tokenizer, args.batch, len(tokenizer))  # warm-up at the same shapes
            rows[cls.name] = measure(engine, tokenizer, args.batch, len(tokenizer))
            rows[cls.name]["finished"], rows[cls.name]["valid"] = validity(cls(tiny, len(tiny)), tiny)
            print(cls.name, rows[cls.name], file=sys.stderr)
    lines = [f"# Grammar engines: JSON-schema masks, batch {args.batch}, vocabulary {len(tokenizer)}", "",
             "`python -m bench.grammar` (median per decode step; 2 threads for the parallel call)", "",
             "| engine | compile (ms, median of 8 schemas) | mask, serial (ms/step) | mask, parallel (ms/step) "
             "| apply (ms/step) | valid / finished random documents (byte tokenizer) |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['compile_ms']:.2f} | {r['mask_serial_ms']:.3f} | {r['mask_parallel_ms']:.3f} "
                     f"| {r['apply_ms']:.3f} | {r['valid']} / {r['finished']} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grammar.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
