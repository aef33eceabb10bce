"""Tables, statistics, figures, MLflow logging of results and the HTML report."""
