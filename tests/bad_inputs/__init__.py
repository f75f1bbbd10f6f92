"""The bad-input corpus (issue 8): every way a user can hand the CLI, the pipeline CLI or a
pipeline step a broken input, and what must happen then.

* :mod:`tests.bad_inputs.inputs` builds the broken files once per session (malformed specs,
  corrupt images and archives, truncated/foreign/pickled checkpoints, a corrupt ONNX file);
* :mod:`tests.bad_inputs.cases` is the case table: the command line or step call, the message
  fragments, and the outputs that must not appear (or must stay as they were);
* :mod:`tests.bad_inputs.test_bad_inputs` runs each case (in-process, a few as real
  subprocesses) and checks the four promises: a clear message, a non-zero exit code, no
  traceback, and no half-written output or stray temp file.
"""
