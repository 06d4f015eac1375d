"""`softprompt serve`: one frozen model, a bank of task prompts, mixed-task batches behind HTTP."""
