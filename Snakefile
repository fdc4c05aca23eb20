# fisher_pipeline: which weights, heads and neurons each task relies on.
# Run: snakemake --cores 2   (see README.md; config keys in config/README.md)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/fisher.smk"
include: "workflow/rules/importance.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/overlap.smk"
include: "workflow/rules/scaled.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
