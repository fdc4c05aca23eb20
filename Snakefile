# fisher_pipeline: which weights, heads and neurons each task relies on.
# Run: snakemake --cores 2   (see README.md; config keys in config/README.md)
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# The default run; a --configfile replaces it (keys it leaves out take the schema's defaults).
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


# common.smk first (config checks, helpers, FINAL_OUTPUTS), then every rule file: each
# phase's file declares its rules and appends its final outputs to FINAL_OUTPUTS.
include: "workflow/rules/common.smk"


for rule_file in sorted(Path(workflow.basedir, "workflow", "rules").glob("*.smk")):
    if rule_file.name != "common.smk":

        include: rule_file


rule all:
    input:
        FINAL_OUTPUTS,
    default_target: True
