"""Example jobs that ship with GPU Scout (``python -m gpuscout.examples.linreg``)."""
