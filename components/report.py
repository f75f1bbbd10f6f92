"""report: latency/accuracy table and Pareto plot as an HTML visualization (gpunet_core.report)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Output

from components._images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def report(validation: Input[Artifact], bench: Input[Artifact], html: Output[HTML]):
    from gpunet_core import steps
    from gpunet_core.report import write_html_report

    steps.timed(write_html_report)([validation.path, bench.path], html.path)
