"""report: latency/accuracy table and Pareto plot as an HTML visualization (gpunet_core.inference.report)."""

from kfp.dsl import HTML, Artifact, Input, Output

from components._images import CPU_IMAGE, component


@component(CPU_IMAGE)
def report(validation: Input[Artifact], bench: Input[Artifact], html: Output[HTML]):
    from gpunet_core import steps

    steps.write_html_report([validation.path, bench.path], html.path)
