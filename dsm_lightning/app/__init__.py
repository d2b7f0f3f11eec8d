"""The application built on the library: the command line (LightningCLI), its LightningModule and DataModule,
the prediction writer, the console and the pictures. The library (everything outside this package) never imports
it."""
