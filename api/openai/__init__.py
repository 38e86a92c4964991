"""The OpenAI-compatible dialect, served by ``api/routes/files.py``, ``fine_tuning.py`` and
``chat.py``: OpenAI's request and response bodies (``schemas``), a reinforcement fine-tuning
request translated into a native job (``translate``, with the graders as reward functions in
``graders``), and this server's datasets, jobs, events and checkpoints as OpenAI's objects
(``objects``). The conversion of an uploaded file's ``messages`` into prompts is the job record's
(``jobs.datasets.prompt_from_messages``): it reads rows as the trainer does."""
