"""The unlearning procedure behind ``unsc_fast.unlearn``: the data it splits off (``data``), when
it stops and when it backs off (``stopping``), how its protection adapts to a request
(``schedule``) and the training loop that runs them (``loop``)."""
