package android.app;

public class Activity extends android.content.Context {
    protected void onCreate(android.os.Bundle savedInstanceState) { throw new RuntimeException("stub"); }
    protected void onDestroy() { throw new RuntimeException("stub"); }
    public void setContentView(int layoutResID) { throw new RuntimeException("stub"); }
    public <T extends android.view.View> T findViewById(int id) { throw new RuntimeException("stub"); }
    public final void runOnUiThread(Runnable action) { throw new RuntimeException("stub"); }
    @Override public java.io.File getExternalFilesDir(String type) { throw new RuntimeException("stub"); }
}
