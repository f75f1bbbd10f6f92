"""report: the run's HTML page, its candidate against the champion history, NVIDIA's published
points apart (gpunet_core.steps.write_html_report)."""

from kfp.dsl import HTML, Artifact, Input, Output

from components._images import CPU_IMAGE, component


@component(CPU_IMAGE)
def report(validation: Input[Artifact], bench: Input[Artifact], registered_model: str,
           promotion: str, html: Output[HTML]):
    """``validation``/``bench``: the deployed graph's results; ``promotion``: promote's output
    (``alias:version``), the candidate's version of ``registered_model`` whose champion
    history (same dataset and hardware fingerprint, read from MLflow) the page compares it
    with."""
    from gpunet_core import steps

    steps.write_html_report([validation.path, bench.path], html.path,
                            registered_model=registered_model, promotion=promotion)
