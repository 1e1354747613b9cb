"""Runnable examples of prunax with FedJAX."""
