"""What several verbs share at run time: device placement, torch.distributed set-up, the training loop."""
