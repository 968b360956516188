"""Write-it-yourself exercises and the checkers that grade them."""
