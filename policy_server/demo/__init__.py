"""The demo page (`streamlit run frontend.py`): a policy server driven from a form made from its `/schema`.

Talks to the server over HTTP only (`client`); may start one as a child process (`launcher`).
`form` and `answers` are plain functions of the server's JSON; `page` is the streamlit layout.
"""
