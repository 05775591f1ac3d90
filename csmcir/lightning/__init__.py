"""Lightning glue: the LightningModule, callbacks and the LightningCLI."""
