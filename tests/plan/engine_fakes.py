"""Made-up `engine` sections (the engine's fixed costs) built from known terms, for pure tests."""

from __future__ import annotations

MODEL = {
    "hidden_size": 256,
    "num_heads": 4,
    "head_dim": 64,
    "kv_width": 256,
    "vocab_size": 2048,
    "layers": [1, 6],
}

#: per device: (prefill a, c, e, s0, s1), (decode a, b, s0), sample per vocab, linear_s;
#: "cpu-int4": the CPU's quantized entries (`quantized=True`), cheaper per layer than "cpu"
TERMS = {
    "cpu": ((100e-6, 2e-9, 1e-12, 300e-6, 1e-6), (150e-6, 2e-10, 400e-6), 1e-9, 1e-6),
    "cuda": ((60e-6, 1e-11, 1e-14, 100e-6, 1e-8), (50e-6, 1e-12, 150e-6), 1e-10, 20e-6),
    "cpu-int4": ((120e-6, 3e-9, 1e-12, 350e-6, 2e-6), (40e-6, 1e-10, 250e-6), 1e-9, 0.0),
    "cpu-moe-int4": ((900e-6, 9e-9, 1e-12, 350e-6, 2e-6), (450e-6, 1e-10, 300e-6), 1e-9, 0.0),
}


def engine_section(
    devices=("cpu", "cuda"),
    dtypes=("float32", "bfloat16", "float16"),
    quantized: bool = False,
    moe: bool = False,
) -> dict:
    """Entries of every device, dtype and family from TERMS; `quantized` adds the CPU's int4
    entries (float32 activations, "cpu-int4" terms, no linear_s), `moe` the int4 entry of the
    moe family too ("cpu-moe-int4" terms)."""
    d, q, kvw = MODEL["hidden_size"], MODEL["num_heads"] * MODEL["head_dim"], MODEL["kv_width"]
    entries = []
    runs = [(device, dtype, "float", ("llama", "opt")) for device in devices for dtype in dtypes]
    if quantized:
        runs.append(("cpu", "float32", "int4", ("llama", "opt")))
    if moe:
        runs.append(("cpu", "float32", "int4", ("moe",)))
    for device, dtype, weights, families in runs:
        key = device if weights == "float" else f"{device}-{weights}"
        key = f"{device}-moe-{weights}" if families == ("moe",) else key
        (pa, pc, pe, s0, s1), (da, db, ds0), sample, lin = TERMS[key]
        kv = 2 * kvw * {"float32": 4}.get(dtype, 2)
        for arch in families:
            entries.append(
                {
                    "device": device,
                    "backend": device,
                    "dtype": dtype,
                    "architecture": arch,
                    "weights": weights,
                    "threads": 4,
                    "sample_s_per_vocab": sample,
                    "prefill": [
                        {
                            "tokens": n,
                            "layer_s": pa + pc * n * d + pe * n * n * q,
                            "token_s": s0 + s1 * n + sample * MODEL["vocab_size"],
                        }
                        for n in (16, 128, 512)
                    ],
                    "decode": [
                        {
                            "context": c,
                            "layer_s": da + db * c * kv,
                            "token_s": ds0 + sample * MODEL["vocab_size"],
                        }
                        for c in (19, 131, 515)
                    ],
                    "linear_s": {m: {"prefill": lin, "decode": lin} for m in ("inline", "split", "stream")}
                    if weights == "float"
                    else {},
                }
            )
    return {"version": 1, "model": dict(MODEL), "entries": entries}


def with_engine(profile: dict, **kwargs) -> dict:
    """`profile` as schema 2 with an engine section."""
    return dict(profile, schema_version=2, engine=engine_section(**kwargs))
