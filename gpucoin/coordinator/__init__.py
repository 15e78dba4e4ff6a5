"""The head's side of a job: the money (``settle``), the spot checks (``checks``) and the flow (``job``)."""
