"""Adapters that let other frameworks use convlock's lock stores unchanged.

- :mod:`convlock.integrations.rasa`: ``ConvlockLockStore``, a Rasa ``LockStore``
  that Rasa's own factory builds from ``endpoints.yml``.

Each adapter imports its framework when it is loaded, and only then: this
package imports nothing, and convlock depends on no framework.
"""
